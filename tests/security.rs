//! Security: TLS to the relay, authentication, redaction, end-to-end encryption and what a
//! relay that tampers with records can and cannot do.

mod common;

use common::certs::Pki;
use common::*;
use std::time::Duration;

#[test]
fn test_certificates_are_made() {
    let pki = Pki::new();
    assert!(std::fs::read_to_string(&pki.ca).unwrap().contains("BEGIN CERTIFICATE"));
}
