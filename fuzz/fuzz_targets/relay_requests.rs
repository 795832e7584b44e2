//! The relay's request parser on arbitrary input, whole and cut in two.
//!
//! It must never panic, and where the input is cut must not change what it means: the
//! requests found in a prefix are a prefix of those found in the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = tube::relay::parse_requests(data);
    if let (Some(&cut), Ok(all)) = (data.first(), &whole) {
        let cut = usize::from(cut) % (data.len() + 1);
        let head = tube::relay::parse_requests(&data[..cut]).expect("a prefix of valid input is valid");
        assert!(head.len() <= all.len());
        assert_eq!(&all[..head.len()], &head[..]);
    }
});
