//! Config files (shoal TOML, seed 004 JSON with `//` comments) and Enterprise Connect env files.
//!
//! Input: the file's text (non-UTF-8 inputs are skipped: both loaders read text). Every input
//! goes through both `config::parse` and `ec::parse_env`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::{config, config_watch, ec};
use shoal_proto::{Command, State, apply};

fn check_config(text: &str) {
    let Ok(file) = config::parse(text) else { return };
    let _ = config::summary(&file);
    let Ok(validated) = file.validate() else { return };
    // `validate` accepts exactly what the node then proposes: the plan against an empty state
    // builds the same pools...
    let mut fresh = State::default();
    let plan = config_watch::plan(None, &fresh, &validated.pools).expect("a validated file plans on an empty state");
    apply(&mut fresh, &Command::Batch(plan.commands)).expect("a validated file applies to an empty state");
    assert_eq!(fresh.pools, validated.pools, "the plan and validate built different pools");
    // ...and the same file again (every start, every poll of an unchanged file) proposes nothing.
    for previous in [None, Some(&validated.pools)] {
        let again = config_watch::plan(previous, &fresh, &validated.pools).expect("a validated file plans again");
        assert!(again.commands.is_empty(), "re-applying the file would change the pools: {:?}", again.changes);
    }
    for (name, _, backends) in &file.pools {
        let pool = &validated.pools[name];
        assert_eq!(&pool.name, name);
        assert!(pool.backends.len() <= backends.len());
    }
}

fn check_env(text: &str) {
    let Ok(vars) = ec::parse_env(text) else { return };
    for (key, value) in &vars {
        assert!(!key.contains('\n') && !value.contains('\n'), "a variable spans lines: {key:?}={value:?}");
        assert_eq!(key.trim(), key, "untrimmed key");
        assert!(!key.contains('='), "key {key:?} contains '='");
    }
    // `setup` resolves host names (DNS): only call it when every gateway is a literal address,
    // so the fuzzer never waits on the network.
    let literal = vars.get("GATEWAY_LIST").is_some_and(|list| {
        let list = list.trim().trim_start_matches('{').trim_end_matches('}');
        list.split_whitespace().all(|e| e.parse::<std::net::SocketAddr>().is_ok())
    });
    if literal && let Ok(setup) = ec::setup(&vars, None) {
        assert!(!setup.gateways.is_empty());
        // The generated pool is checked like any config (it may refuse e.g. port 0).
        let _ = setup.config().validate();
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_config(text);
    check_env(text);
});
