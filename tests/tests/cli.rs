//! The `shoal` CLI against a running node, and `shoal check-config`.

use std::process::Output;
use std::time::Duration;

use shoal_tests::{HttpBackend, TestNode, eventually};

/// The admin token of the nodes these tests start.
const TOKEN: &str = "cli-test-token-0123456789";

fn shoal(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_shoal-under-test"))
        .args(args)
        .env_remove("SHOAL_ADMIN")
        .env("SHOAL_TOKEN", TOKEN)
        .output()
        .expect("run shoal")
}

fn ok(args: &[&str]) -> String {
    let out = shoal(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "shoal {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_003_verbs_against_a_node() {
    let node = TestNode::start_in("cli-1", tempfile::tempdir().expect("dir"), |o| o.admin_token = TOKEN.into()).await;
    let admin = format!("http://{}", node.handle.admin_addr());
    let (a, b) = (HttpBackend::start("a").await, HttpBackend::start("b").await);
    let a_addr = a.addr.to_string();
    let b_addr = b.addr.to_string();
    let admin2 = admin.clone();
    tokio::task::spawn_blocking(move || {
        let admin = admin2.as_str();
        assert!(
            ok(&["pool", "add", "web", "--pattern", "/", "--interval-ms", "300", "--admin", admin])
                .contains("pool web saved")
        );
        ok(&["backend", "add", "web", &a_addr, "--url-path", "/", "--admin", admin]);
        ok(&["backend", "add", "web", &b_addr, "--weight", "2", "--admin", admin]);
        // Global flags before the verb, as `kubectl --context X get …`.
        let list = ok(&["--admin", admin, "pool", "list"]);
        assert!(list.contains("web") && list.contains("http /"), "{list}");
        let status = ok(&["status", "--admin", admin]);
        assert!(status.contains("cli-1") && status.contains("leader"), "{status}");
    })
    .await
    .expect("cli");
    let health = eventually(Duration::from_secs(10), "health table shows both healthy", || {
        let admin = admin.clone();
        async move {
            let out =
                tokio::task::spawn_blocking(move || ok(&["pool", "health", "web", "--admin", &admin])).await.ok()?;
            (out.matches("BS_HEALTHY").count() == 2).then_some(out)
        }
    })
    .await;
    assert!(health.starts_with("Pool  Status\nweb   PS_FULL\nBackend"), "{health}");
    let a_addr = a.addr.to_string();
    tokio::task::spawn_blocking(move || {
        let admin = admin.as_str();
        assert!(ok(&["backend", "drain", "web", &a_addr, "--admin", admin]).contains("draining"));
        assert!(ok(&["pool", "health", "web", "--admin", admin]).contains("BS_DRAINING"));
        ok(&["backend", "rm", "web", &a_addr, "--admin", admin]);
        let json = ok(&["--json", "--admin", admin, "pool", "health", "web"]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("json output");
        assert_eq!(v["backends"].as_array().map(Vec::len), Some(1));
        let out = shoal(&["backend", "add", "missing", "127.0.0.1:1", "--admin", admin]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("pool \"missing\" does not exist"));
        ok(&["pool", "rm", "web", "--admin", admin]);
        let out = shoal(&["status", "--admin", "http://127.0.0.1:1"]);
        assert_eq!(out.status.code(), Some(1), "unreachable admin is an error");
        let out = shoal(&["status", "--admin", admin, "--token", "wrong-token-000000000"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unauthorized (401"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await
    .expect("cli");
    node.stop().await;
}

#[test]
fn check_config_names_the_key_and_exits_nonzero() {
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[pools.web]\npattern = \"/\"\n[pools.web.backends.\"127.0.0.1:8082\"]\nweight = 2\n")
        .expect("write");
    assert!(ok(&["check-config", good.to_str().expect("utf8")]).contains("ok, 1 pools"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pools.web]\npattern = \"/\"\n[pools.web.health]\nfall = 0\n").expect("write");
    let out = shoal(&["check-config", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pools.web.health.fall"), "{err}");
    let open = dir.path().join("open.toml");
    let hb = "[pools.logic]\nprotocol = \"tcp\"\nlisten = 3001\nself_register = true\n[pools.logic.health]\nheartbeat_port = 5000\n";
    std::fs::write(&open, hb).expect("write");
    let out = shoal(&["check-config", open.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "an open self-registering pool is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pools.logic.health.heartbeat_secret") && err.contains("allow_unauthenticated_heartbeats"),
        "{err}"
    );
    std::fs::write(
        &open,
        hb.replace("self_register = true\n", "self_register = true\nallow_unauthenticated_heartbeats = true\n"),
    )
    .expect("write");
    ok(&["check-config", open.to_str().expect("utf8")]);
    let missing = shoal(&["check-config", "/nonexistent/shoal.toml"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn shipped_example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/examples") {
        let path = entry.expect("entry").path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("toml" | "json")) {
            ok(&["check-config", path.to_str().expect("utf8")]);
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} example configs found");
}
