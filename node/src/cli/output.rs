//! What the CLI prints: aligned tables like seed 003's `poolHealth`, or raw JSON with `--json`.

use serde::Serialize;
use shoal_proto::admin::{ClusterView, PoolHealth, RemovedNode, WriteResult};
use shoal_proto::{Pool, Protocol};

use super::ClientArgs;

/// Prints rows as columns separated by two spaces, padded to the widest cell.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn written(c: &ClientArgs, r: &WriteResult, what: &str) -> anyhow::Result<()> {
    if c.json {
        return json(r);
    }
    println!("{what} (config version {})", r.version);
    Ok(())
}

pub fn left(c: &ClientArgs, r: &serde_json::Value, pool: &str, addr: &str) -> anyhow::Result<()> {
    if c.json {
        return json(r);
    }
    let waited = r["waited_ms"].as_u64().unwrap_or(0);
    if r["drained"] == true {
        println!("backend {addr} left {pool} after draining for {waited} ms (config version {})", r["version"]);
    } else {
        println!("backend {addr} left {pool}; {} connections were still open after {waited} ms", r["active_left"]);
    }
    Ok(())
}

pub fn health(c: &ClientArgs, h: &PoolHealth) -> anyhow::Result<()> {
    if c.json {
        return json(h);
    }
    let mut status = h.status.as_str().to_string();
    if h.fail_open {
        status.push_str(" (fail-open)");
    }
    let mut head = vec![vec!["Pool".into(), "Status".into()], vec![h.pool.clone(), status]];
    if let Some(cov) = h.pinned_coverage {
        head[0].push("Pinned coverage".into());
        head[1].push(format!("{}/{} backends", cov.covered, cov.total));
    }
    print!("{}", table(&head));
    let mut rows =
        vec![vec!["Backend".into(), "Status".into(), "Weight".into(), "Zone".into(), "Active".into(), "Note".into()]];
    for b in &h.backends {
        rows.push(vec![
            b.addr.to_string(),
            b.status.as_str().into(),
            b.weight.to_string(),
            b.zone.clone(),
            b.active.to_string(),
            note(b),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

fn note(b: &shoal_proto::admin::BackendHealth) -> String {
    let mut parts = Vec::new();
    if let Some(slot) = b.slot {
        parts.push(format!("gw{slot}"));
    }
    if b.dynamic {
        parts.push("self-registered".into());
    }
    if b.upgraded > 0 {
        parts.push(format!("{} websockets ({} pinned)", b.upgraded, b.pinned));
    }
    if let Some(r) = &b.reason {
        parts.push(r.clone());
    }
    parts.join("; ")
}

pub fn pools(c: &ClientArgs, pools: &[Pool]) -> anyhow::Result<()> {
    if c.json {
        return json(&pools);
    }
    let mut rows = vec![vec!["Pool".into(), "Frontend".into(), "Algorithm".into(), "Check".into(), "Backends".into()]];
    for p in pools {
        let frontend = match p.spec.protocol {
            Protocol::Http => format!("http {}", p.spec.pattern.clone().unwrap_or_default()),
            Protocol::Tcp => format!("tcp :{}", p.spec.listen.unwrap_or(0)),
        };
        let algorithm = super::choice::serde_name(p.spec.algorithm);
        let check = super::choice::serde_name(p.spec.check());
        rows.push(vec![p.name.clone(), frontend, algorithm, check, p.backends.len().to_string()]);
    }
    print!("{}", table(&rows));
    Ok(())
}

pub fn removed(c: &ClientArgs, r: &RemovedNode) -> anyhow::Result<()> {
    if c.json {
        return json(r);
    }
    let role = if r.voter { "voter" } else { "learner" };
    let names = |v: &[String]| if v.is_empty() { "(none)".to_string() } else { v.join(", ") };
    println!("{} (Raft id {}, {role}) removed from the membership", r.node, r.raft_id);
    println!("voters: {}  learners: {}", names(&r.voters), names(&r.learners));
    Ok(())
}

pub fn cluster(c: &ClientArgs, v: &ClusterView) -> anyhow::Result<()> {
    if c.json {
        return json(v);
    }
    println!(
        "answered by {}  leader {}  term {}  commit {}  applied {}  config version {}",
        v.node,
        v.leader.as_deref().unwrap_or("(none)"),
        v.term,
        v.commit_index,
        v.applied_index,
        v.config_version
    );
    let mut rows = vec![vec![
        "Node".into(),
        "Role".into(),
        "Voter".into(),
        "Live".into(),
        "Ready".into(),
        "Admin".into(),
        "HTTP".into(),
        "Cluster".into(),
        "Zone".into(),
    ]];
    for n in &v.nodes {
        rows.push(vec![
            n.id.clone(),
            n.role.clone(),
            yes(n.voter),
            yes(n.live),
            yes(n.ready),
            n.admin.clone(),
            n.http.clone().unwrap_or_default(),
            n.cluster.clone().unwrap_or_default(),
            n.zone.clone(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

fn yes(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_like_the_seed() {
        let t = super::table(&[
            vec!["Backend".into(), "Status".into()],
            vec!["127.0.0.1:8082".into(), "BS_HEALTHY".into()],
        ]);
        assert_eq!(t, "Backend         Status\n127.0.0.1:8082  BS_HEALTHY\n");
    }
}
