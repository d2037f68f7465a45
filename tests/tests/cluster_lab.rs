//! Gateways that keep their shared records in a cluster's Redis: a real
//! redis-server in a namespace of its own, the real daemon with `--cluster`,
//! the CLI working against the cluster. Needs root.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use gatekeeper_tests::{
    cluster::{knock_and_connect, shared, start_nodes},
    fwknop,
    lab::{ChildGuard, Daemon, Lab, Role, SHARED_ADDR, eventually, gw, tcp_request},
    nmap,
    pki::LabCa,
    redis::{RedisServer, Sentinels},
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

const NODES: u8 = 3;

/// A cluster of three nodes behind the router on one Redis (see
/// [`start_nodes`]).
fn three_nodes() -> Result<(Lab, RedisServer, Vec<Daemon>, std::path::PathBuf)> {
    let mut lab = Lab::cluster(NODES)?;
    let redis = RedisServer::start(&lab, Role::Store)?;
    let (daemons, cred) = start_nodes(&mut lab, &redis.url(), NODES)?;
    Ok((lab, redis, daemons, cred))
}

/// Waits until every node has subscribed to the grants on `redis`.
fn all_subscribed(redis: &RedisServer) -> Result<bool> {
    eventually(Duration::from_secs(10), || {
        Ok(redis
            .cli(&["PUBSUB", "NUMSUB", "gatekeeper:grants"])?
            .lines()
            .nth(1)
            .is_some_and(|n| n.trim() == NODES.to_string()))
    })
}

/// One counter of a node's gate.
fn stat(lab: &Lab, node: Role, name: &str) -> Result<u64> {
    let out = lab.cli_on(node, &["stats", "--json"])?;
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(stats[name].as_u64().unwrap_or(0))
}

#[test]
fn knocks_and_connections_land_on_different_nodes_and_still_get_in() -> Result<()> {
    let (lab, _redis, _daemons, cred) = three_nodes()?;
    let scan = nmap::scan(&lab, Role::Intruder, "-sS", "1-1024", &SHARED_ADDR.to_string())?;
    ensure!(scan.answered_in(22, 22).is_empty(), "a stranger sees tcp/22: {scan:?}");
    ensure!(
        !lab.tcp_echo_works(Role::Client, shared(22), None)?,
        "closed before knocking"
    );

    let rounds = 200u16;
    let mut got_in = 0;
    for i in 0..rounds {
        if knock_and_connect(&lab, &cred, 30000 + i, 22)? {
            got_in += 1;
        }
    }
    let verified: Vec<usize> = (1..=NODES)
        .map(|n| {
            lab.audit_of(Role::Node(n))
                .map(|a| a.iter().filter(|l| l["result"] == "accepted").count())
        })
        .collect::<Result<_>>()?;
    let passed: Vec<u64> = (1..=NODES)
        .map(|n| stat(&lab, Role::Node(n), "pass_whitelisted"))
        .collect::<Result<_>>()?;
    println!(
        "{got_in} of {rounds} rounds got in; knocks verified per node {verified:?}; whitelisted packets per node {passed:?}"
    );
    ensure!(got_in == rounds, "{got_in} of {rounds} rounds got in");
    ensure!(verified.iter().sum::<usize>() == rounds as usize, "{verified:?}");
    ensure!(
        verified.iter().all(|&v| v > 0) && passed.iter().all(|&p| p > 0),
        "the router spread knocks {verified:?} and connections {passed:?} over every node"
    );
    Ok(())
}

#[test]
fn a_knock_replayed_to_another_node_is_refused() -> Result<()> {
    let (lab, _redis, _daemons, cred) = three_nodes()?;
    let seen = knock_accepted_by(&lab, &cred, 1)?;
    let line = knocks_audited(&lab, 1)?.last().cloned().unwrap_or_default();
    ensure!(
        line["degraded"].is_null(),
        "claimed in the cluster, not degraded: {line}"
    );
    // Resent from the client's own address, as a replay must be to pass
    // every other check: only the shared replay cache can tell.
    ensure!(knock_reason_at(&lab, 2, seen)? == "replay");
    Ok(())
}

#[test]
fn an_fwknop_packet_opens_every_node_once_and_is_a_replay_on_the_others() -> Result<()> {
    let (lab, redis, _daemons, _cred) = three_nodes()?;
    let node = |n: u8, port| SocketAddr::new(Role::Node(n).addr().into(), port);
    ensure!(
        !lab.tcp_echo_works(Role::Client, node(2, 22), None)?,
        "closed before knocking"
    );
    // Enrolled while the nodes run: each starts handing fwknop's packets
    // to its daemon once it has read the new client.
    let cred = lab.scratch().join("oldphone.credential.toml");
    let said = lab.state_cli_on(
        Role::Node(1),
        &[
            "client",
            "add",
            "oldphone",
            "--allow",
            "tcp/22",
            "--fwknop",
            "--out",
            &cred.to_string_lossy(),
            "--cluster",
            &redis.url(),
        ],
    )?;
    let (rc, stanza) = fwknop::write_stanza(&lab, &said, "oldphone")?;
    ensure!(
        stanza.contains(&format!("SPA_SERVER          {SHARED_ADDR}")),
        "{stanza}"
    );
    let mut packet = Vec::new();
    let accepted = eventually(Duration::from_secs(15), || {
        packet = fwknop::knock(&lab, Role::Client, &rc, "oldphone", &["--test"])?;
        Ok(knock_reason_at(&lab, 1, packet.clone()).is_ok_and(|r| r == "accepted"))
    })?;
    ensure!(
        accepted,
        "node 1 never accepted the packet: {:?}",
        knocks_audited(&lab, 1)?
    );
    // The grant is every node's; the packet, anywhere else, a replay.
    ensure!(
        eventually(Duration::from_secs(5), || lab.tcp_echo_works(
            Role::Client,
            node(2, 22),
            None
        ))?,
        "node 2 did not open the grant node 1 published"
    );
    for n in [2, 3] {
        let replay = eventually(Duration::from_secs(10), || {
            Ok(knock_reason_at(&lab, n, packet.clone()).is_ok_and(|r| r == "replay"))
        })?;
        ensure!(replay, "node {n}: {:?}", knocks_audited(&lab, n)?);
    }
    Ok(())
}

#[test]
fn a_revocation_from_one_nodes_cli_shuts_the_client_out_of_every_node() -> Result<()> {
    let (lab, redis, _daemons, cred) = three_nodes()?;
    every_round_gets_in(&lab, &cred, 31000, 12, "got in")?;
    for n in 1..=NODES {
        let list = lab.cli_on(Role::Node(n), &["whitelist", "list", "--json"])?;
        ensure!(
            String::from_utf8_lossy(&list.stdout).contains("10.77.0.2"),
            "node {n} holds the client's grants"
        );
    }
    let url = redis.url();
    let all = all_nodes_whitelist(&lab, &url)?;
    let nodes = all["nodes"].as_array().cloned().unwrap_or_default();
    ensure!(
        nodes.len() == usize::from(NODES)
            && nodes.iter().all(|n| n["entries"].to_string().contains("10.77.0.2"))
            && all["silent"] == serde_json::json!([]),
        "every node's map, asked from one: {all}"
    );
    let out = lab.state_cli_on(Role::Node(3), &["client", "revoke", "laptop", "--cluster", &url])?;
    ensure!(
        out.contains("applied by every running node (gw-1, gw-2, gw-3)"),
        "{out}"
    );
    for n in 1..=NODES {
        let list = lab.cli_on(Role::Node(n), &["whitelist", "list", "--json"])?;
        let list = String::from_utf8_lossy(&list.stdout);
        ensure!(
            !list.contains("10.77.0.2"),
            "node {n} closed the client's entries: {list}"
        );
    }
    ensure!(
        !knock_and_connect(&lab, &cred, 32000, 22)?,
        "its next knock opens nothing"
    );
    Ok(())
}

/// A fresh knock for tcp/22 from any source port.
fn fresh_knock(lab: &Lab, cred: &std::path::Path) -> Result<Vec<u8>> {
    lab.with_knocker(Role::Client, cred, |k, _| {
        Ok(k.build(SHARED_ADDR.into(), &tcp_request(22), 0)?)
    })
}

/// The knocks node `n` audited so far.
fn knocks_audited(lab: &Lab, n: u8) -> Result<Vec<serde_json::Value>> {
    Ok(lab
        .audit_of(Role::Node(n))?
        .into_iter()
        .filter(|l| l["event"] == "knock")
        .collect())
}

/// Sends `knock` from the client to node `n`'s own address; what the
/// node made of it: `accepted`, or why it refused it.
fn knock_reason_at(lab: &Lab, n: u8, knock: Vec<u8>) -> Result<String> {
    let before = knocks_audited(lab, n)?.len();
    lab.send_udp(
        Role::Client,
        SocketAddr::new(Role::Node(n).addr().into(), KNOCK_PORT),
        knock,
    )?;
    ensure!(
        eventually(Duration::from_secs(3), || Ok(knocks_audited(lab, n)?.len() > before))?,
        "node {n} audited no knock"
    );
    let line = knocks_audited(lab, n)?[before].clone();
    Ok(line["reason"]
        .as_str()
        .or(line["result"].as_str())
        .unwrap_or("")
        .to_string())
}

/// A fresh knock that node `n` accepted: its bytes, for resending.
fn knock_accepted_by(lab: &Lab, cred: &std::path::Path, n: u8) -> Result<Vec<u8>> {
    let knock = fresh_knock(lab, cred)?;
    let reason = knock_reason_at(lab, n, knock.clone())?;
    ensure!(reason == "accepted", "node {n}: {reason}");
    Ok(knock)
}

#[test]
fn redis_restarted_empty_loses_nothing() -> Result<()> {
    let (lab, mut redis, _daemons, cred) = three_nodes()?;
    let seen = knock_accepted_by(&lab, &cred, 1)?;
    // SIGKILL, and a new server that keeps nothing on disk: empty.
    redis.restart()?;
    let restored = eventually(Duration::from_secs(5), || {
        Ok(redis.cli(&["EXISTS", "gatekeeper:server_key"])?.trim() == "1"
            && redis.cli(&["HEXISTS", "gatekeeper:clients", "laptop"])?.trim() == "1"
            && redis.cli(&["EXISTS", "gatekeeper:config"])?.trim() == "1"
            && !redis.cli(&["KEYS", "gatekeeper:nonce:*"])?.trim().is_empty())
    })?;
    ensure!(
        restored,
        "the nodes wrote the records and nonces back: {}\n{}",
        redis.cli(&["KEYS", "*"])?,
        _daemons[0].log()
    );
    ensure!(
        knock_reason_at(&lab, 2, seen)? == "replay",
        "a knock seen before the restart is still a replay"
    );
    every_round_gets_in(&lab, &cred, 33000, 20, "after the restart got in")?;
    let url = redis.url();
    let out = lab.state_cli_on(Role::Node(2), &["client", "revoke", "laptop", "--cluster", &url])?;
    ensure!(out.contains("(gw-1, gw-2, gw-3)"), "{out}");
    Ok(())
}

#[test]
fn a_node_killed_and_restarted_loses_nothing() -> Result<()> {
    let (lab, redis, mut daemons, cred) = three_nodes()?;
    let url = redis.url();
    daemons[1].kill9()?;
    // Asked for their maps at once, the running nodes answer and the dead
    // one, whose last report is still recent, is named.
    let all = all_nodes_whitelist(&lab, &url)?;
    ensure!(all["silent"] == serde_json::json!(["gw-2"]), "{all}");
    ensure!(all["nodes"].as_array().map(Vec::len) == Some(2), "{all}");
    // While node 2 is down, node 1 lets the client in from port 34000.
    let req = gatekeeper::knock::send::Request {
        proto: gatekeeper::spec::Proto::Tcp,
        ports: gatekeeper::spec::PortRange { lo: 22, hi: 22 },
        source_port: Some(34000),
    };
    let knock = lab.with_knocker(Role::Client, &cred, move |k, _| {
        Ok(k.build(SHARED_ADDR.into(), &req, 34000)?)
    })?;
    let at = |n: u8| SocketAddr::new(Role::Node(n).addr().into(), 22);
    // From the port it names, as `gatekeeper knock --source-port` sends it.
    let to = SocketAddr::new(Role::Node(1).addr().into(), KNOCK_PORT);
    lab.in_ns(Role::Client, move || -> Result<()> {
        std::net::UdpSocket::bind(("0.0.0.0", 34000))?.send_to(&knock, to)?;
        Ok(())
    })??;
    ensure!(
        eventually(Duration::from_secs(3), || lab.tcp_echo_works(
            Role::Client,
            at(3),
            Some(34000)
        ))?,
        "node 3 got the grant"
    );
    ensure!(
        !lab.tcp_echo_works(Role::Client, at(2), Some(34000))?,
        "node 2, down, did not (its gate stayed closed)"
    );
    daemons[1] = lab.start_daemon_on(
        Role::Node(2),
        &["--protect", "tcp/22", "--cluster", &url, "--node", "gw-2"],
    )?;
    ensure!(
        lab.tcp_echo_works(Role::Client, at(2), Some(34000))?,
        "restarted, node 2 opened the live grant before it gated"
    );
    ensure!(
        daemons[1].log().contains("opened the cluster's live grants"),
        "{}",
        daemons[1].log()
    );
    Ok(())
}

#[test]
fn with_redis_away_a_node_decides_alone_or_refuses_as_configured() -> Result<()> {
    let (lab, mut redis, mut daemons, cred) = three_nodes()?;
    let url = redis.url();
    // Node 3 is set to refuse what it cannot claim.
    daemons[2].stop()?;
    std::fs::write(
        lab.state_dir_of(Role::Node(3)).join("gatekeeper.toml"),
        "[knock]\nrate = 1000\nburst = 1000\nkey_rate = 1000\nkey_burst = 1000\n\n[cluster]\nwhen_unreachable = \"refuse\"\n",
    )?;
    daemons[2] = lab.start_daemon_on(
        Role::Node(3),
        &["--protect", "tcp/22", "--cluster", &url, "--node", "gw-3"],
    )?;
    redis.stop();
    let node = |n: u8| SocketAddr::new(Role::Node(n).addr().into(), 22);

    // Node 1 (`local`, the default) decides alone, opens itself, and
    // audits the knock as degraded.
    ensure!(knock_reason_at(&lab, 1, fresh_knock(&lab, &cred)?)? == "accepted");
    let line = knocks_audited(&lab, 1)?.last().cloned().unwrap_or_default();
    ensure!(line["degraded"] == "cluster_unreachable", "{line}");
    ensure!(
        lab.tcp_echo_works(Role::Client, node(1), None)?,
        "node 1 let the client in"
    );
    ensure!(
        daemons[0].log().contains("unreachable"),
        "node 1 said why: {}",
        daemons[0].log()
    );

    // Node 3 refuses.
    ensure!(knock_reason_at(&lab, 3, fresh_knock(&lab, &cred)?)? == "cluster_unreachable");
    ensure!(
        !lab.tcp_echo_works(Role::Client, node(3), None)?,
        "node 3 opened nothing"
    );

    // Back, and empty: the nodes write the records back, and knocks work
    // across nodes again.
    redis.restart()?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(redis
            .cli(&["HEXISTS", "gatekeeper:clients", "laptop"])?
            .trim()
            == "1"))?,
        "the records came back"
    );
    ensure!(all_subscribed(&redis)?, "every node subscribed again");
    every_round_gets_in(&lab, &cred, 35000, 10, "after Redis came back got in")?;
    Ok(())
}

#[test]
fn a_sentinel_failover_is_followed_without_help() -> Result<()> {
    let mut lab = Lab::cluster(NODES)?;
    let mut primary = RedisServer::start(&lab, Role::Store)?;
    let replica = RedisServer::replica_of(&lab, &primary, 6380)?;
    let sentinels = Sentinels::start(&lab, &primary, 3)?;
    let url = sentinels.url();
    let (_daemons, cred) = start_nodes(&mut lab, &url, NODES)?;
    every_round_gets_in(&lab, &cred, 36000, 10, "before the failover got in")?;
    let seen = knock_accepted_by(&lab, &cred, 1)?;

    primary.stop();
    ensure!(
        eventually(Duration::from_secs(20), || Ok(sentinels
            .primary_port()
            .is_ok_and(|p| p == replica.port())))?,
        "the Sentinels promoted the replica"
    );
    ensure!(all_subscribed(&replica)?, "every node follows the new primary");
    every_round_gets_in(&lab, &cred, 36100, 10, "after the failover got in")?;
    // What the old primary knew reached the new one (or was written back).
    ensure!(knock_reason_at(&lab, 2, seen)? == "replay");
    let out = lab.state_cli_on(Role::Node(3), &["client", "revoke", "laptop", "--cluster", &url])?;
    ensure!(
        out.contains("applied by every running node (gw-1, gw-2, gw-3)"),
        "{out}"
    );
    ensure!(
        !knock_and_connect(&lab, &cred, 36200, 22)?,
        "revoked through the new primary: shut out"
    );
    Ok(())
}

#[test]
fn garbage_and_grants_no_client_may_hold_open_nothing() -> Result<()> {
    let (lab, redis, mut daemons, cred) = three_nodes()?;
    let url = redis.url();
    let list: serde_json::Value =
        serde_json::from_str(&lab.state_cli_on(Role::Node(1), &["client", "list", "--json", "--cluster", &url])?)?;
    let owner = list["clients"][0]["id"].as_u64().unwrap_or_default();
    ensure!(owner != 0, "{list}");
    let intruder = Role::Intruder.addr().to_string();
    let grant = |owner: u64, lo: u16, hi: u16, expires_ms: u64| {
        let grants = serde_json::json!([{"node": "elsewhere", "addr": intruder, "src_port": 0, "proto": 6,
            "lo": lo, "hi": hi, "expires_ms": expires_ms, "owner": owner}]);
        format!("elsewhere\n{grants}")
    };
    let later = gatekeeper::clock::unix_now_ms() + 60_000;
    for msg in [
        String::new(),
        "not json".into(),
        "{\"node\":".into(),
        "[".repeat(100_000),
        format!("elsewhere\n{}", "[".repeat(100_000)),
        "elsewhere\n".into(),
        "\u{fffd}\u{7f}\u{1b}[2J".into(),
        // Well formed, but no enrolled client may hold them: an unknown
        // owner, ports outside the client's policy, a grant run out.
        grant(owner + 1000, 22, 22, later),
        grant(owner, 1, 1024, later),
        grant(owner, 22, 22, 1),
    ] {
        redis.cli(&["PUBLISH", "gatekeeper:grants", &msg])?;
    }
    std::thread::sleep(Duration::from_millis(300));
    for (n, d) in daemons.iter_mut().enumerate() {
        ensure!(d.running(), "node {} still runs", n + 1);
        let list = lab.cli_on(Role::Node(n as u8 + 1), &["whitelist", "list", "--json"])?;
        let list = String::from_utf8_lossy(&list.stdout);
        ensure!(!list.contains(&intruder), "node {} opened a grant: {list}", n + 1);
    }
    ensure!(
        !lab.tcp_echo_works(Role::Intruder, shared(22), None)?,
        "the intruder is still shut out"
    );
    ensure!(knock_and_connect(&lab, &cred, 37000, 22)?, "and the nodes still work");
    Ok(())
}

/// The tunnels as the cluster lists them.
fn cluster_tunnels(lab: &Lab, url: &str) -> Result<Vec<serde_json::Value>> {
    let out = lab.state_cli_on(Role::Node(1), &["tunnel", "list", "--json", "--cluster", url])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    Ok(json.as_array().cloned().unwrap_or_default())
}

#[test]
fn a_tunnel_is_served_by_whichever_node_a_visitor_lands_on() -> Result<()> {
    const PRIVATE_PORT: u16 = 8080;
    let (mut lab, redis, _daemons, cred) = three_nodes()?;
    let url = redis.url();
    lab.serve_tcp_echo(Role::Agent, PRIVATE_PORT)?;
    ensure!(
        eventually(Duration::from_secs(5), || Ok(redis
            .cli(&["HLEN", "gatekeeper:nodes"])?
            .trim()
            == NODES.to_string()))?,
        "every node reported"
    );
    let token = lab.state_cli_on(
        Role::Node(2),
        &[
            "tunnel",
            "issue",
            "web",
            "--owner",
            "ops",
            "--allow",
            "laptop",
            "--cluster",
            &url,
        ],
    )?;
    let nodes = gatekeeper::tunnels::Token::decode(&token)?.nodes;
    ensure!(
        nodes.len() == usize::from(NODES),
        "the token names every node: {nodes:?}"
    );
    let token_file = lab.scratch().join("web.token");
    gatekeeper::private_file::write(&token_file, token.trim())?;
    let port = cluster_tunnels(&lab, &url)?
        .first()
        .and_then(|t| t["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .context("the tunnel's public port")?;

    let forward = format!("127.0.0.1:{PRIVATE_PORT}");
    let token_arg = token_file.to_str().context("utf-8 path")?;
    let _agent = ChildGuard::new(lab.spawn_gatekeeper(
        Role::Agent,
        &["agent", "--token-file", token_arg, "--forward", &forward],
    )?);
    ensure!(
        eventually(Duration::from_secs(20), || Ok(cluster_tunnels(&lab, &url)?
            .first()
            .and_then(|t| t["nodes"].as_array().map(Vec::len))
            == Some(usize::from(NODES))))?,
        "the agent holds a session with every node: {:?}",
        cluster_tunnels(&lab, &url)?
    );
    let status = lab.state_cli_on(Role::Node(1), &["status"])?;
    ensure!(
        (1..=NODES).all(|n| status.contains(&format!("at {}, tunnels web", Role::Node(n).addr()))),
        "status names each node's address and the tunnel it serves: {status}"
    );

    let scan = nmap::scan(
        &lab,
        Role::Intruder,
        "-sS",
        &format!("{port},7443"),
        &SHARED_ADDR.to_string(),
    )?;
    ensure!(
        scan.answered_in(port, port).is_empty() && scan.answered_in(7443, 7443).is_empty(),
        "a stranger sees the tunnel: {scan:?}"
    );
    let rounds = 30u16;
    let mut got_in = 0;
    for i in 0..rounds {
        if knock_and_connect(&lab, &cred, 38000 + i, port)? {
            got_in += 1;
        }
    }
    ensure!(got_in == rounds, "{got_in} of {rounds} visits got through");
    let served = |n: u8| -> Result<usize> {
        Ok(lab
            .audit_of(Role::Node(n))?
            .iter()
            .filter(|l| l["event"] == "tunnel_connection")
            .count())
    };
    ensure!(
        eventually(Duration::from_secs(5), || Ok((1..=NODES)
            .map(served)
            .collect::<Result<Vec<_>>>()?
            .iter()
            .all(|&s| s > 0)))?,
        "every node served visitors through its own session: {:?}",
        (1..=NODES).map(served).collect::<Result<Vec<_>>>()?
    );
    Ok(())
}

/// `whitelist list --all-nodes --json`, asked from node 1's CLI.
fn all_nodes_whitelist(lab: &Lab, url: &str) -> Result<serde_json::Value> {
    let out = lab.state_cli_on(
        Role::Node(1),
        &["whitelist", "list", "--all-nodes", "--json", "--cluster", url],
    )?;
    Ok(serde_json::from_str(&out)?)
}

#[test]
fn nodes_reach_redis_over_tls_and_check_its_certificate() -> Result<()> {
    let mut lab = Lab::cluster(NODES)?;
    // A CA of the lab's own, and a certificate for the Redis host's address.
    let ca = LabCa::new("gatekeeper lab CA")?;
    let issued = ca.issue(
        "lab redis",
        vec![rcgen::SanType::IpAddress(Role::Store.addr().into())],
        Vec::new(),
    )?;
    let dir = lab.scratch().join("redis-tls");
    std::fs::create_dir_all(&dir)?;
    let (ca_file, cert_file, key_file) = (dir.join("ca.pem"), dir.join("redis.pem"), dir.join("redis.key"));
    std::fs::write(&ca_file, ca.pem())?;
    std::fs::write(&cert_file, &issued.cert)?;
    std::fs::write(&key_file, &issued.key)?;
    let redis = RedisServer::start_tls(&lab, Role::Store, 6390, &cert_file, &key_file, &ca_file)?;
    let url = redis.url();
    ensure!(url.starts_with("rediss://"), "{url}");

    // Without the lab's CA, the server's certificate is refused, and said so.
    let shared = SHARED_ADDR.to_string();
    let refused = lab.state_cli_on(Role::Node(1), &["init", "--public-addr", &shared, "--cluster", &url]);
    let why = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
    ensure!(
        why.contains("certificate") || why.contains("Issuer"),
        "refused for the certificate: {why}"
    );

    lab.set_gatekeeper_env("SSL_CERT_FILE", &ca_file);
    let (_daemons, cred) = start_nodes(&mut lab, &url, NODES)?;
    every_round_gets_in(&lab, &cred, 39000, 10, "over TLS got in")?;
    let seen = knock_accepted_by(&lab, &cred, 1)?;
    ensure!(knock_reason_at(&lab, 2, seen)? == "replay");
    Ok(())
}

/// `rounds` knock-and-connect rounds from source ports `first` on: each
/// must get in.
fn every_round_gets_in(lab: &Lab, cred: &std::path::Path, first: u16, rounds: u16, what: &str) -> Result<()> {
    for i in 0..rounds {
        ensure!(knock_and_connect(lab, cred, first + i, 22)?, "round {i} {what}");
    }
    Ok(())
}
