//! Gateways that keep their shared records in a cluster's Redis: a real
//! redis-server in a namespace of its own, the real daemon with `--cluster`,
//! the CLI working against the cluster. Needs root.

use std::time::Duration;

use anyhow::{Result, ensure};
use gatekeeper_tests::{
    lab::{Lab, Role, eventually, gw, tcp_request},
    redis::RedisServer,
};

const KNOCK_PORT: u16 = 62201;

/// A lab with an echo service on tcp/22 and a Redis host on the lab
/// network.
fn lab_with_redis() -> Result<(Lab, RedisServer)> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.add_host(Role::Store)?;
    let redis = RedisServer::start(&lab, Role::Store)?;
    Ok((lab, redis))
}

#[test]
fn a_node_verifies_clients_enrolled_in_the_cluster_and_applies_revocations() -> Result<()> {
    let (lab, redis) = lab_with_redis()?;
    let url = redis.url();
    let cluster = ["--cluster", url.as_str()];
    let out = lab.state_cli(&[&["init", "--public-addr", "10.77.0.1"][..], &cluster].concat())?;
    ensure!(out.contains(&url), "{out}");
    let again = lab.state_cli(&[&["init", "--public-addr", "10.77.0.1"][..], &cluster].concat());
    ensure!(
        again.as_ref().is_err_and(|e| e.to_string().contains("--force")),
        "a second init is refused: {again:?}"
    );
    let cred = lab.scratch().join("laptop.credential.toml");
    let cred_arg = cred.to_string_lossy().into_owned();
    let add = [
        &["client", "add", "laptop", "--allow", "tcp/22", "--out", &cred_arg][..],
        &cluster,
    ]
    .concat();
    let out = lab.state_cli(&add)?;
    ensure!(out.contains("enrolled laptop"), "{out}");
    ensure!(
        redis.cli(&["HEXISTS", "gatekeeper:clients", "laptop"])?.trim() == "1",
        "the record is in Redis"
    );
    ensure!(
        !lab.state_dir().join("clients").exists(),
        "and not in the state directory"
    );

    let _daemon = lab.start_daemon(&["--protect", "tcp/22", "--cluster", &url, "--node", "gw-a"])?;
    let knock = lab.with_knocker(Role::Client, &cred, |k, server| {
        Ok(k.build(server, &tcp_request(22), 0)?)
    })?;
    lab.send_udp(Role::Client, gw(KNOCK_PORT), knock)?;
    ensure!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(
            Role::Client,
            gw(22),
            None
        ))?,
        "a client enrolled in the cluster gets in: {:?}",
        lab.audit()?
    );

    let out = lab.state_cli(&[&["client", "revoke", "laptop"][..], &cluster].concat())?;
    ensure!(out.contains("applied by every running node (gw-a)"), "{out}");
    ensure!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "revoked: shut out at once"
    );
    let status: serde_json::Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    ensure!(status["cluster"]["nodes"][0]["name"] == "gw-a", "{status}");
    Ok(())
}
