//! The scenario tube exists for: an h264 camera stream through a relay, decoded on the far
//! side, frame for frame identical to the same two ffmpeg commands joined by a plain pipe.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Encodes a synthetic clip as raw h264 on stdout. One encoder thread keeps it deterministic.
const ENCODE: &str = "ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc=size=320x240:rate=25 \
     -t 6 -c:v libx264 -threads 1 -pix_fmt yuv420p -g 25 -f h264 -";
/// Decodes h264 from stdin and prints one hash per frame.
const DECODE: &str = "ffmpeg -hide_banner -loglevel error -f h264 -i pipe:0 -f framemd5 -";

fn shell(script: &str, relay: Option<&TestRelay>) -> Output {
    let mut c = Command::new("bash");
    c.args(["-o", "pipefail", "-c", script]);
    if let Some(r) = relay {
        c.env("TUBE_URL", r.url());
    }
    Proc::spawn(c).wait(Duration::from_secs(120))
}

fn frame_hashes(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

relay_tests! {
    fn h264_through_tube_decodes_to_the_same_frames_as_a_plain_pipe(kind) {
        assert!(
            Command::new("ffmpeg").arg("-version").output().is_ok(),
            "ffmpeg is not installed: run `apt-get install -y ffmpeg` (CI's .ci/run does)"
        );
        let relay = TestRelay::start(kind);
        let direct = shell(&format!("{ENCODE} | {DECODE}"), None);
        assert_eq!(direct.code(), Some(0), "{}", direct.stderr);
        let expected = frame_hashes(&direct);
        assert_eq!(expected.len(), 150, "6 s at 25 frames per second");

        let tube = tube_bin().display().to_string();
        let reader = {
            let mut c = Command::new("bash");
            c.args(["-o", "pipefail", "-c", &format!("{tube} read cam1 | {DECODE}")]);
            c.env("TUBE_URL", relay.url());
            Proc::spawn(c)
        };
        let writer = shell(&format!("{ENCODE} | {tube} write cam1"), Some(&relay));
        assert_eq!(writer.code(), Some(0), "{}", writer.stderr);
        let decoded = reader.wait(Duration::from_secs(120));
        assert_eq!(decoded.code(), Some(0), "{}", decoded.stderr);
        assert_eq!(frame_hashes(&decoded), expected);
    }
}
