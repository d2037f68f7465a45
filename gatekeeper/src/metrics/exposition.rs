//! One scrape's text: the event counters, then what the daemon's status
//! says right now, as gauges and counters built for this scrape alone.

use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use super::Events;
use crate::control::Status;

type Labelled<M> = Family<Vec<(&'static str, String)>, M>;

/// The OpenMetrics text for `events` and, when the daemon answered,
/// `status`.
pub fn render(events: &Events, status: Option<&Status>) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode_registry(&mut text, events.registry());
    if let Some(s) = status {
        let _ = encode_registry(&mut text, &status_registry(s));
    }
    let _ = encode_eof(&mut text);
    text
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g = Gauge::<i64>::default();
    g.set(value.min(i64::MAX as u64) as i64);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn status_registry(s: &Status) -> Registry {
    let mut r = Registry::with_prefix("gatekeeper");
    r.register(
        "build",
        "The running daemon: its release and revision, its gate and its mode",
        Info::new(vec![
            ("version", s.version.clone()),
            ("gate", s.gate.clone()),
            ("mode", s.mode.clone()),
        ]),
    );
    gauge(
        &mut r,
        "start_time_seconds",
        "When the daemon started, unix seconds",
        s.started,
    );

    let xdp = Labelled::<Counter>::default();
    for i in &s.interfaces {
        for (outcome, n) in &i.counters {
            xdp.get_or_create(&vec![("interface", i.name.clone()), ("outcome", outcome.clone())])
                .inc_by(*n);
        }
    }
    r.register(
        "xdp_packets",
        "Packets the gate's program saw on each interface, by outcome (passed or dropped and why; `gatekeeper stats` names them)",
        xdp,
    );
    gauge(
        &mut r,
        "interfaces_uncovered",
        "Interfaces receiving traffic for this host that the gate does not span",
        s.uncovered.len() as u64,
    );
    gauge(
        &mut r,
        "whitelist_entries",
        "Whitelist entries in the gate at the last sweep",
        s.entries,
    );
    gauge(
        &mut r,
        "clients_enrolled",
        "Clients enrolled in the state",
        s.clients.enrolled as u64,
    );
    gauge(
        &mut r,
        "clients_allowed",
        "Enrolled clients allowed to knock now",
        s.clients.allowed as u64,
    );
    gauge(
        &mut r,
        "state_problems",
        "Records in the state the daemon had to skip",
        s.clients.problems.len() as u64,
    );

    let connected = Labelled::<Gauge>::default();
    let connections = Labelled::<Counter>::default();
    let bytes = Labelled::<Counter>::default();
    let streams = Labelled::<Gauge>::default();
    for t in &s.tunnels {
        let name = || vec![("tunnel", t.name.clone())];
        connected.get_or_create(&name()).set(t.connected as i64);
        connections.get_or_create(&name()).inc_by(t.connections);
        streams.get_or_create(&name()).set(t.streams as i64);
        for (direction, n) in [("in", t.bytes_in), ("out", t.bytes_out)] {
            bytes
                .get_or_create(&vec![("tunnel", t.name.clone()), ("direction", direction.into())])
                .inc_by(n);
        }
    }
    r.register(
        "tunnel_agent_connected",
        "1 while the tunnel's agent holds a session with this gateway",
        connected,
    );
    r.register(
        "tunnel_connections",
        "Public connections carried by the tunnel's current session",
        connections,
    );
    r.register(
        "tunnel_bytes",
        "Bytes the tunnel's current session carried: in from visitors, out to them",
        bytes,
    );
    r.register("tunnel_streams", "Connections open through the tunnel now", streams);

    let a = &s.audit;
    counter(&mut r, "audit_lines", "Lines written to the audit trail", a.lines);
    counter(
        &mut r,
        "audit_summarized",
        "Refusals counted into summary lines instead of written one each",
        a.summarized,
    );
    counter(
        &mut r,
        "audit_dropped",
        "Audit lines lost because the writer fell behind",
        a.dropped,
    );
    counter(
        &mut r,
        "audit_write_errors",
        "Writes to the audit file that failed",
        a.write_errors,
    );

    let expiry = Labelled::<Gauge>::default();
    for c in &s.certificates {
        expiry
            .get_or_create(&vec![("serves", c.serves.join(",")), ("subject", c.subject.clone())])
            .set(c.not_after.min(i64::MAX as u64) as i64);
    }
    r.register(
        "certificate_expiry_seconds",
        "When each served certificate expires, unix seconds; the daemon renews its own a third of its lifetime ahead",
        expiry,
    );

    if let Some(c) = &s.cluster {
        let nodes = Labelled::<Gauge>::default();
        for state in ["running", "silent"] {
            let n = c.nodes.iter().filter(|n| n.live == (state == "running")).count();
            nodes.get_or_create(&vec![("state", state.into())]).set(n as i64);
        }
        r.register(
            "cluster_nodes",
            "Nodes of this gateway's cluster, by whether they reported within the last few seconds",
            nodes,
        );
    }
    if let Some(relay) = &s.relay {
        gauge(
            &mut r,
            "relay_agents",
            "Relay agents holding a session with this node",
            relay.agents.len() as u64,
        );
        gauge(
            &mut r,
            "relay_requests_in_flight",
            "Relayed requests waiting for their agent's answer",
            relay.requests_in_flight as u64,
        );
        counter(
            &mut r,
            "relay_requests",
            "Requests relayed to an agent since this node started",
            relay.requests,
        );
        let dropped = Labelled::<Counter>::default();
        for (reason, n) in &relay.dropped {
            dropped.get_or_create(&vec![("reason", reason.clone())]).inc_by(*n);
        }
        r.register("relay_dropped", "Relay messages dropped unread, by reason", dropped);
    }
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::control::{ClientsStatus, InterfaceStatus, TunnelStatus};

    fn status() -> Status {
        Status {
            pid: 1,
            version: "0.1.0".into(),
            started: 1_700_000_000,
            gate: "eth0".into(),
            pin_dir: "/sys/fs/bpf/gatekeeper/eth0".into(),
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                attachment: "driver".into(),
                counters: BTreeMap::from([("drop_protected".into(), 7), ("pass_whitelisted".into(), 3)]),
            }],
            uncovered: Vec::new(),
            mode: "enforce".into(),
            protect: "tcp/22".into(),
            state_dir: "/var/lib/gatekeeper".into(),
            knocks: true,
            entries: 2,
            knock_totals: Default::default(),
            clients: ClientsStatus {
                enrolled: 3,
                allowed: 2,
                problems: Vec::new(),
            },
            tunnel_port: Some(7443),
            tunnels: vec![TunnelStatus {
                name: "web".into(),
                connected: true,
                since: Some(1_700_000_100),
                connections: 4,
                bytes_in: 100,
                bytes_out: 200,
                streams: 1,
            }],
            portal: None,
            audit: Default::default(),
            counters: BTreeMap::new(),
            cluster: None,
            relay: None,
            certificates: Vec::new(),
        }
    }

    /// The text is well-formed OpenMetrics carrying the status's figures.
    #[test]
    fn a_scrape_carries_events_and_status() {
        let events = Events::default();
        events.knock("udp", "accepted", "", Some(0.0002));
        events.knock("udp", "rejected", "bad_tag", None);
        events.portal("guidance");
        events.event("agent_session", "connected");
        assert_eq!(
            events.knock_totals(),
            crate::metrics::KnockTotals {
                accepted: 1,
                rejected: 1,
                failed: 0
            }
        );
        let text = render(&events, Some(&status()));
        for line in [
            r#"gatekeeper_knocks_total{carrier="udp",result="accepted",reason=""} 1"#,
            r#"gatekeeper_knocks_total{carrier="udp",result="rejected",reason="bad_tag"} 1"#,
            r#"gatekeeper_knock_open_seconds_count 1"#,
            r#"gatekeeper_portal_sessions_total{decision="guidance"} 1"#,
            r#"gatekeeper_audit_events_total{event="agent_session",result="connected"} 1"#,
            r#"gatekeeper_xdp_packets_total{interface="eth0",outcome="drop_protected"} 7"#,
            r#"gatekeeper_whitelist_entries 2"#,
            r#"gatekeeper_clients_enrolled 3"#,
            r#"gatekeeper_tunnel_bytes_total{tunnel="web",direction="out"} 200"#,
            r#"gatekeeper_tunnel_agent_connected{tunnel="web"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    /// Every series the shipped Grafana dashboard queries is one a
    /// daemon serves (with a cluster, a relay and one event of each kind).
    #[test]
    fn the_dashboard_queries_only_served_series() {
        let events = Events::default();
        events.knock("udp", "accepted", "", Some(0.001));
        events.portal("upstream");
        events.event("agent_session", "connected");
        let mut s = status();
        s.cluster = Some(crate::control::ClusterStatus {
            location: "redis://r".into(),
            node: "a".into(),
            nodes: Vec::new(),
        });
        s.relay = Some(Default::default());
        s.relay.as_mut().unwrap().dropped.insert("replayed".into(), 1);
        let text = render(&events, Some(&s));
        let served: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/grafana-dashboard.json")).unwrap();
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("gatekeeper_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(served.contains(name.as_str()), "{name} in {expr:?} is not served");
                    queried += 1;
                }
            }
        }
        assert!(queried >= 16, "{queried}");
    }

    /// Without the daemon's answer, the event counters still serve.
    #[test]
    fn no_status_serves_the_events_alone() {
        let events = Events::default();
        events.knock("tcp", "rejected", "replay", None);
        let text = render(&events, None);
        assert!(text.contains(r#"gatekeeper_knocks_total{carrier="tcp",result="rejected",reason="replay"} 1"#));
        assert!(!text.contains("gatekeeper_whitelist_entries"));
    }
}
