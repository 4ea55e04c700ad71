//! Issue 4: the daemon binds its own addresses before it contacts any peer or witness, and a
//! config whose addresses are not on this host (the 10.99 lab configs started outside the
//! lab) stops it with one clear error, before anything is sent.

use std::path::Path;

use nbdmirror_tests::TestEnv;

#[test]
fn the_lab_configs_refuse_to_start_outside_the_lab() {
    let env = TestEnv::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/netns-pair");
    for node in ["node-a.toml", "node-b.toml"] {
        let cfg = env.path(node);
        std::fs::copy(examples.join(node), &cfg).unwrap();
        // The test's namespace has only loopback: 10.99.x.x is not an address here.
        let out = env.run_nbdmirror(&["serve", "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.code, Some(1), "{out}");
        let last = out
            .stderr
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(
            last.starts_with("error:") && last.contains("not an address of this host"),
            "{out}"
        );
        // Nothing was created: the check comes before the data directory and the sockets.
        assert!(
            !env.path("state").exists(),
            "{node} created its data directory"
        );
    }
}
