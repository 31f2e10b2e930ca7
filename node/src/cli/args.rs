//! Global client flags anywhere on the command line. Operators type `shoal --admin URL pool add …`
//! as they would `kubectl --context X get …` or `consul -http-addr=X members`. clap's global args
//! cannot share a name with `shoal node --admin ADDR` (the node's own listen address), so the
//! client flags given before the verb are moved behind it, where every admin verb accepts them.

use std::ffi::{OsStr, OsString};

use clap::Parser;

use super::Cli;

/// Client flags that take a value (`--admin URL` or `--admin=URL`).
const VALUED: &[&str] = &["--admin", "--token", "--token-file", "--admin-ca"];
/// Client switches.
const SWITCHES: &[&str] = &["--json"];

/// Parses the process's command line, accepting the client flags before the verb too.
pub fn parse() -> Cli {
    Cli::parse_from(hoist_client_flags(std::env::args_os()))
}

/// Moves the client flags that precede the first verb to the end of the arguments (before a
/// `--`, if any). Everything else keeps its order, so clap still reports bad input as usual.
pub fn hoist_client_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args = args.into_iter();
    let mut out: Vec<OsString> = args.next().into_iter().collect();
    let mut hoisted = Vec::new();
    let mut rest: Vec<OsString> = Vec::new();
    while let Some(arg) = args.next() {
        match leading_flag(&arg) {
            Some(Flag::Valued) => {
                hoisted.push(arg);
                hoisted.extend(args.next());
            }
            Some(Flag::Inline | Flag::Switch) => hoisted.push(arg),
            None => {
                rest.push(arg);
                rest.extend(args.by_ref());
            }
        }
    }
    let end = rest.iter().position(|a| a == "--").unwrap_or(rest.len());
    out.extend(rest.drain(..end));
    out.extend(hoisted);
    out.extend(rest);
    out
}

enum Flag {
    /// `--admin URL`: the value is the next argument.
    Valued,
    /// `--admin=URL`.
    Inline,
    Switch,
}

fn leading_flag(arg: &OsStr) -> Option<Flag> {
    let arg = arg.to_str()?;
    let name = arg.split_once('=').map_or(arg, |(name, _)| name);
    if VALUED.contains(&name) {
        Some(if name.len() == arg.len() { Flag::Valued } else { Flag::Inline })
    } else if SWITCHES.contains(&arg) {
        Some(Flag::Switch)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{ClusterCmd, Command, PoolCmd};

    fn hoist(line: &str) -> Vec<String> {
        let args = line.split(' ').map(OsString::from);
        hoist_client_flags(args).into_iter().map(|a| a.into_string().expect("utf8")).collect()
    }

    #[test]
    fn flags_before_the_verb_move_behind_it() {
        assert_eq!(
            hoist("shoal --admin http://h:8081 --json pool add api --pattern /api/"),
            "shoal pool add api --pattern /api/ --admin http://h:8081 --json".split(' ').collect::<Vec<_>>()
        );
        assert_eq!(hoist("shoal --token=t status"), ["shoal", "status", "--token=t"]);
        assert_eq!(hoist("shoal --token-file f status -- x"), ["shoal", "status", "--token-file", "f", "--", "x"]);
    }

    #[test]
    fn everything_else_keeps_its_order() {
        let line = "shoal pool add api --admin http://h:8081 --json";
        assert_eq!(hoist(line), line.split(' ').collect::<Vec<_>>());
        assert_eq!(hoist("shoal --version"), ["shoal", "--version"]);
        assert_eq!(hoist("shoal --admin"), ["shoal", "--admin"]);
    }

    #[test]
    fn global_flags_reach_the_verb_either_way() {
        for line in ["shoal --admin http://h:1 --json pool list", "shoal pool list --json --admin http://h:1"] {
            let cli = Cli::try_parse_from(hoist(line)).expect("parses");
            let Command::Pool(PoolCmd::List { client }) = cli.command else { panic!("not pool list: {line}") };
            assert_eq!(client.admin, "http://h:1");
            assert!(client.json);
        }
    }

    #[test]
    fn pool_add_sends_only_the_limit_flags_given() {
        let line = "shoal pool add gw --pattern / --max-connections 5 --slow-start-s 30 --outlier-consecutive-5xx 3";
        let Command::Pool(PoolCmd::Add(a)) = Cli::try_parse_from(hoist(line)).expect("parses").command else {
            panic!("not pool add")
        };
        let mut body = serde_json::json!({});
        crate::cli::add_limits(&mut body, &a);
        let want = serde_json::json!({"max_connections": 5, "slow_start_s": 30, "outlier": {"consecutive_5xx": 3}});
        assert_eq!(body, want);
        let orphan = "shoal pool add gw --pattern / --outlier-base-ejection-ms 100";
        assert!(Cli::try_parse_from(hoist(orphan)).is_err(), "outlier settings need --outlier-consecutive-5xx");
    }

    fn pool_body(line: &str) -> serde_json::Value {
        let Command::Pool(PoolCmd::Add(a)) = Cli::try_parse_from(hoist(line)).expect("parses").command else {
            panic!("not pool add")
        };
        crate::cli::pool_body(&a)
    }

    #[test]
    fn pool_add_sends_the_serde_names_of_its_enum_flags() {
        let http = pool_body("shoal pool add web --pattern / --algorithm least-conn --check heartbeat");
        assert_eq!((&http["protocol"], &http["algorithm"]), (&"http".into(), &"least_conn".into()));
        assert_eq!(http["health"], serde_json::json!({"check": "heartbeat"}));
        assert_eq!(http.get("send_proxy"), None);
        let tcp = pool_body("shoal pool add db --listen 3001 --check none --send-proxy v2");
        assert_eq!((&tcp["protocol"], &tcp["algorithm"]), (&"tcp".into(), &"round_robin".into()));
        assert_eq!((&tcp["health"]["check"], &tcp["send_proxy"]), (&"none".into(), &"v2".into()));
        let tcp = pool_body("shoal pool add db --protocol tcp --algorithm maglev --check tcp --send-proxy v1");
        assert_eq!((&tcp["protocol"], &tcp["algorithm"]), (&"tcp".into(), &"maglev".into()));
        assert_eq!((&tcp["health"]["check"], &tcp["send_proxy"]), (&"tcp".into(), &"v1".into()));
        let copied = pool_body("shoal pool add web --pattern / --algorithm least_conn");
        assert_eq!(copied["algorithm"], "least_conn", "the config file's spelling is taken too");
        for rejected in ["--algorithm round-robbin", "--check HTTP2", "--protocol udp", "--send-proxy v3"] {
            let line = format!("shoal pool add web --pattern / {rejected}");
            assert!(Cli::try_parse_from(hoist(&line)).is_err(), "{rejected}");
        }
    }

    #[test]
    fn cluster_remove_takes_a_name_or_id_and_the_client_flags() {
        let cli = Cli::try_parse_from(hoist("shoal --admin http://h:1 cluster remove lb-3 --json")).expect("parses");
        let Command::Cluster(ClusterCmd::Remove { id, client }) = cli.command else { panic!("not cluster remove") };
        assert_eq!((id.as_str(), client.admin.as_str(), client.json), ("lb-3", "http://h:1", true));
        assert!(Cli::try_parse_from(hoist("shoal cluster remove")).is_err(), "the node is required");
    }

    #[test]
    fn a_flag_the_verb_does_not_take_is_still_an_error() {
        assert!(Cli::try_parse_from(hoist("shoal --json dev")).is_err());
    }
}
