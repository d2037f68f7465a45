//! The real XDP program, run by the kernel on frames through
//! `BPF_PROG_TEST_RUN`, against the reference model: hand-written frames
//! with the verdict spelled out, then a long run of generated ones.
//! Needs root (loading BPF programs, pinning on bpffs).

use std::time::Duration;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use gatekeeper::{
    clock,
    gate::{
        Gate, loader,
        ring::{self, Record},
    },
    spec::Prefix,
};
use gatekeeper_common::{
    decide::{Action, Decision, Reason},
    knock,
    maps::{
        AllowValue, BPF_F_MMAPABLE, CFG_ANY_TCP, CFG_ANY_UDP, CFG_FWKNOP, CFG_KNOCK_KEYS, CFG_PROTECT_ECHO, Config,
        MODE_AUDIT, PresenceCount, WhitelistKey, WhitelistValue,
    },
    proto,
};
use gatekeeper_tests::{
    frames::{
        self, ACK, FrameSpec, Generator, L4, Net, PSH, Pools, SYN, TPID_8021AD, TPID_8021Q, knock_key_id, knock_nonce,
        knock_payload, knock_v2_payload, tcp, udp,
    },
    lab::Pins,
    model::{Model, addr},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const GW4: [u8; 4] = [10, 0, 0, 1];
const GW6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const HOUR: u64 = 3_600_000_000_000;

fn v6(last: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[14..].copy_from_slice(&last.to_be_bytes());
    a
}

fn entry(expires_ns: u64, last_seen_ns: u64, lo: u16, hi: u16) -> WhitelistValue {
    WhitelistValue {
        last_seen_ns,
        ..WhitelistValue::new(expires_ns, lo, hi, 0, 0)
    }
}

/// The length of the knock whose nonce the standard model's replay cache holds.
const REPLAYED_LEN: usize = 77;
/// Buckets the verdict tests never empty.
const PLENTY: u32 = 1_000_000;

/// Protected: tcp/22, tcp/8000-8100, udp/53, udp/5353, echo, and port
/// 33000 in the ephemeral range (where replies pass). A handful of
/// whitelist entries (live, dead, lingering, any-port, exact, IPv6) and two
/// allowlist prefixes (live and expired). The key id of `knock_payload` is
/// enrolled, and the nonce of a knock of `REPLAYED_LEN` bytes was seen.
fn standard_model(mode: u32) -> Model {
    let now = clock::now_ns();
    let config = Config {
        mode,
        flags: CFG_ANY_TCP | CFG_ANY_UDP | CFG_PROTECT_ECHO | CFG_KNOCK_KEYS,
        idle_timeout_ns: 60_000_000_000,
        // Rate 0: each source gets exactly `burst` knocks, so the kernel and
        // the model agree without depending on when each frame ran.
        knock_rate_per_sec: 0,
        knock_burst: 5,
        ephemeral_lo: 32768,
        ephemeral_hi: 60999,
        knock_udp_port: 62201,
        _pad: 0,
        audit_sample_every: 0,
        // Rate 0 again: the key and budget buckets stay deterministic.
        knock_key_rate_per_sec: 0,
        knock_key_burst: PLENTY,
        knock_budget_per_sec: 0,
        knock_budget_burst: PLENTY,
        _pad2: 0,
    };
    let mut m = Model::new(
        config,
        "tcp/22,tcp/8000-8100,tcp/33000,udp/53,udp/5353,udp/33000,icmp"
            .parse()
            .expect("valid spec"),
    );
    {
        let mut w = m.whitelist.borrow_mut();
        w.insert(
            WhitelistKey::new(addr("10.0.0.2"), 40000, proto::TCP),
            entry(now + HOUR, 0, 22, 22),
        );
        w.insert(
            WhitelistKey::new(addr("10.0.0.3"), 0, proto::TCP),
            entry(now + HOUR, 0, 8000, 8100),
        );
        w.insert(WhitelistKey::new(addr("10.0.0.4"), 0, proto::UDP), entry(1, 0, 53, 53));
        w.insert(
            WhitelistKey::new(addr("10.0.0.5"), 0, proto::TCP),
            entry(1, now - 1_000_000_000, 22, 22),
        );
        w.insert(
            WhitelistKey::new(addr("10.0.0.6"), 0, proto::ICMP),
            entry(now + HOUR, 0, 0, 65535),
        );
        w.insert(
            WhitelistKey::new(addr("10.0.0.7"), 0, proto::UDP),
            entry(now + HOUR, 0, 1, 65535),
        );
        w.insert(WhitelistKey::new(v6(2), 0, proto::TCP), entry(now + HOUR, 0, 22, 22));
        let mut two = entry(now + HOUR, 0, 22, 22);
        two.add_span(8050, 8050);
        w.insert(WhitelistKey::new(addr("10.0.0.8"), 0, proto::TCP), two);
        w.insert(
            WhitelistKey::new(v6(2), 40000, proto::UDP),
            entry(now + HOUR, 0, 53, 53),
        );
    }
    m.enroll(knock_key_id());
    m.replay.insert(knock_nonce(REPLAYED_LEN));
    m.allow(
        "192.168.50.0/24".parse::<Prefix>().expect("prefix"),
        AllowValue { expires_ns: now + HOUR },
    );
    m.allow(
        "172.16.0.0/12".parse::<Prefix>().expect("prefix"),
        AllowValue { expires_ns: 1 },
    );
    m
}

struct Harness {
    ebpf: Ebpf,
    gate: Gate,
    model: Model,
    /// The instance reads bare IP packets (a tunnel device's), not frames.
    bare_ip: bool,
    _pins: Pins,
}

impl Harness {
    fn new(model: Model) -> Result<Harness> {
        Harness::with(model, loader::Instance::default())
    }

    fn with(model: Model, instance: loader::Instance) -> Result<Harness> {
        let pins = Pins::new()?;
        let ebpf = loader::load_pinned(pins.dir(), 65536, instance)?;
        let gate = Gate::open(pins.dir())?;
        model.install(&gate)?;
        Ok(Harness {
            ebpf,
            gate,
            model,
            bare_ip: instance.bare_ip,
            _pins: pins,
        })
    }

    /// Runs the real program once on `frame`; returns its XDP action.
    fn run(&mut self, frame: &[u8]) -> Result<u32> {
        let prog = loader::program(&mut self.ebpf)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        Ok(prog.test_run(opts)?.return_value)
    }

    /// Runs `frame` through the model and the kernel; returns both.
    fn both(&mut self, frame: &[u8]) -> Result<(Decision, u32)> {
        let now = clock::now_ns();
        let want = if self.bare_ip {
            self.model.decide_ip(frame, now)
        } else {
            self.model.decide(frame, now)
        };
        let got = self.run(frame)?;
        Ok((want, got))
    }

    fn stats(&self) -> Result<Vec<u64>> {
        Ok(self.gate.stats()?.into_iter().map(|(_, v)| v).collect())
    }

    /// Drains the event ring; returns the knock payloads in it.
    fn drain_events(&self) -> Result<Vec<Vec<u8>>> {
        let mut ring = self.gate.events()?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(Record::Knock(k)) = ring::decode(&item) {
                out.push(k.payload);
            }
        }
        Ok(out)
    }
}

fn xdp_code(a: Action) -> u32 {
    match a {
        Action::Pass => XDP_PASS,
        Action::Drop | Action::Divert => XDP_DROP,
    }
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    action: Action,
    reason: Reason,
}

fn case(name: &'static str, spec: FrameSpec, action: Action, reason: Reason) -> Case {
    Case {
        name,
        frame: spec.build(),
        action,
        reason,
    }
}

fn v4(src: &str, l4: L4) -> FrameSpec {
    let a: std::net::Ipv4Addr = src.parse().expect("test address");
    FrameSpec::v4(a.octets(), GW4, l4)
}

fn hand_written_cases() -> Vec<Case> {
    use Action::{Divert, Drop, Pass};
    let mut cases = vec![
        Case {
            name: "arp",
            frame: frames::arp(),
            action: Pass,
            reason: Reason::NotIp,
        },
        case(
            "syn to unprotected port",
            v4("203.0.113.9", tcp(5000, 80, SYN)),
            Pass,
            Reason::Unprotected,
        ),
        case(
            "syn to protected port, stranger",
            v4("203.0.113.9", tcp(5000, 22, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "exact tuple whitelisted",
            v4("10.0.0.2", tcp(40000, 22, SYN)),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "exact entry, other source port",
            v4("10.0.0.2", tcp(40001, 22, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "any-port entry, port in range",
            v4("10.0.0.3", tcp(1234, 8050, SYN)),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "any-port entry, port outside range",
            v4("10.0.0.3", tcp(1234, 22, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "entry with two ranges, first",
            v4("10.0.0.8", tcp(1234, 22, SYN)),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "entry with two ranges, second",
            v4("10.0.0.8", tcp(1234, 8050, SYN)),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "entry with two ranges, neither",
            v4("10.0.0.8", tcp(1234, 8000, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "entry for tcp does not open udp",
            v4("10.0.0.3", udp(1234, 53, b"q")),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "expired and idle entry",
            v4("10.0.0.4", udp(1234, 53, b"q")),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "expired entry, active flow continues",
            v4("10.0.0.5", tcp(1234, 22, ACK)),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "expired entry, no new connection",
            v4("10.0.0.5", tcp(1234, 22, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "allowlisted prefix",
            v4("192.168.50.9", tcp(1234, 22, SYN)),
            Pass,
            Reason::Allowlisted,
        ),
        case(
            "expired allowlist prefix",
            v4("172.16.1.1", tcp(1234, 22, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "reply to the gateway's own connection",
            v4("203.0.113.9", tcp(443, 33000, SYN | ACK)),
            Pass,
            Reason::Reply,
        ),
        case(
            "syn to a protected ephemeral port",
            v4("203.0.113.9", tcp(443, 33000, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "udp reply on a protected ephemeral port",
            v4("203.0.113.9", udp(53, 33000, b"a")),
            Pass,
            Reason::Reply,
        ),
        case(
            "echo request, stranger",
            v4(
                "203.0.113.9",
                L4::Icmp {
                    typ: 8,
                    payload: vec![1; 8],
                },
            ),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "echo request, whitelisted",
            v4(
                "10.0.0.6",
                L4::Icmp {
                    typ: 8,
                    payload: vec![1; 8],
                },
            ),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "echo reply passes, even one with text, while no client knocks with fwknop",
            v4(
                "203.0.113.9",
                L4::Icmp {
                    typ: 0,
                    payload: b"QUJD".repeat(50),
                },
            ),
            Pass,
            Reason::IcmpControl,
        ),
        case(
            "icmp error passes",
            v4(
                "203.0.113.9",
                L4::Icmp {
                    typ: 3,
                    payload: vec![0; 28],
                },
            ),
            Pass,
            Reason::IcmpControl,
        ),
        case(
            "gre is not gated",
            v4(
                "203.0.113.9",
                L4::Raw {
                    proto: 47,
                    bytes: vec![0; 8],
                },
            ),
            Pass,
            Reason::OtherProtocol,
        ),
        case(
            "udp knock of minimum length",
            v4("203.0.113.9", udp(5000, 53, &knock_payload(knock::MIN_LEN))),
            Divert,
            Reason::KnockDiverted,
        ),
        case(
            "udp knock one byte short",
            v4("203.0.113.9", udp(5000, 53, &knock_payload(knock::MIN_LEN - 1))),
            Drop,
            Reason::KnockBadLength,
        ),
        case(
            "udp knock of maximum length",
            v4("203.0.113.10", udp(5000, 53, &knock_payload(knock::MAX_LEN))),
            Divert,
            Reason::KnockDiverted,
        ),
        case(
            "udp knock one byte long",
            v4("203.0.113.9", udp(5000, 53, &knock_payload(knock::MAX_LEN + 1))),
            Drop,
            Reason::KnockBadLength,
        ),
        case(
            "knock to the knock port",
            v4("203.0.113.11", udp(5000, 62201, &knock_payload(100))),
            Divert,
            Reason::KnockDiverted,
        ),
        case(
            "garbage to the knock port",
            v4("203.0.113.11", udp(5000, 62201, b"hello")),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "knock with a key id nobody enrolled",
            v4(
                "203.0.113.12",
                udp(5000, 62201, &{
                    let mut p = knock_payload(100);
                    p[knock::PREFIX.len()] ^= 0xff;
                    p
                }),
            ),
            Drop,
            Reason::KnockUnknownKey,
        ),
        case(
            "knock whose nonce the replay cache holds",
            v4("203.0.113.13", udp(5000, 62201, &knock_payload(REPLAYED_LEN))),
            Drop,
            Reason::KnockReplayed,
        ),
        case(
            "knock prefix to an unprotected port is ordinary traffic",
            v4("203.0.113.9", udp(5000, 80, &knock_payload(100))),
            Pass,
            Reason::Unprotected,
        ),
        case(
            "tcp syn knock",
            v4(
                "203.0.113.12",
                L4::Tcp {
                    sport: 5000,
                    dport: 22,
                    flags: SYN,
                    payload: knock_payload(120),
                },
            ),
            Divert,
            Reason::KnockDiverted,
        ),
        case(
            "knock prefix inside an established stream is not a knock",
            v4(
                "203.0.113.12",
                L4::Tcp {
                    sport: 5000,
                    dport: 22,
                    flags: ACK | PSH,
                    payload: knock_payload(120),
                },
            ),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "echo knock",
            v4(
                "203.0.113.13",
                L4::Icmp {
                    typ: 8,
                    payload: knock_payload(90),
                },
            ),
            Divert,
            Reason::KnockDiverted,
        ),
        case(
            "vlan tagged, protected",
            v4("203.0.113.9", tcp(5000, 22, SYN)).tagged(&[(TPID_8021Q, 5)]),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "q-in-q tagged, whitelisted",
            v4("10.0.0.2", tcp(40000, 22, SYN)).tagged(&[(TPID_8021AD, 5), (TPID_8021Q, 6)]),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "three vlan tags are refused",
            v4("10.0.0.2", tcp(40000, 22, SYN)).tagged(&[(TPID_8021AD, 5), (TPID_8021Q, 6), (TPID_8021Q, 7)]),
            Drop,
            Reason::Malformed,
        ),
        case(
            "ipv6 whitelisted",
            FrameSpec::v6(v6(2), GW6, tcp(1234, 22, SYN)),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "ipv6 stranger",
            FrameSpec::v6(v6(9), GW6, tcp(1234, 22, SYN)),
            Drop,
            Reason::NotAllowed,
        ),
        case(
            "ipv6 exact udp tuple",
            FrameSpec::v6(v6(2), GW6, udp(40000, 53, b"q")),
            Pass,
            Reason::Whitelisted,
        ),
        case(
            "neighbour solicitation passes",
            FrameSpec::v6(
                v6(9),
                GW6,
                L4::Icmp {
                    typ: 135,
                    payload: vec![0; 16],
                },
            ),
            Pass,
            Reason::IcmpControl,
        ),
        case(
            "icmpv6 echo, stranger",
            FrameSpec::v6(
                v6(9),
                GW6,
                L4::Icmp {
                    typ: 128,
                    payload: vec![0; 16],
                },
            ),
            Drop,
            Reason::NotAllowed,
        ),
    ];

    let mut opts = v4("10.0.0.2", tcp(40000, 22, SYN));
    if let Net::V4 { options, .. } = &mut opts.net {
        *options = vec![1; 12];
    }
    cases.push(case(
        "ipv4 options, whitelisted",
        opts,
        Action::Pass,
        Reason::Whitelisted,
    ));

    for (name, src, action, reason) in [
        (
            "non-first fragment, stranger",
            "203.0.113.9",
            Action::Drop,
            Reason::FragmentUnmatched,
        ),
        (
            "non-first fragment, any-port entry",
            "10.0.0.3",
            Action::Pass,
            Reason::Whitelisted,
        ),
        (
            "non-first fragment, allowlisted",
            "192.168.50.9",
            Action::Pass,
            Reason::Allowlisted,
        ),
    ] {
        let mut f = v4(
            src,
            L4::Raw {
                proto: proto::TCP,
                bytes: vec![0; 40],
            },
        );
        if let Net::V4 { frag_offset, .. } = &mut f.net {
            *frag_offset = 10;
        }
        cases.push(case(name, f, action, reason));
    }
    let mut first = v4("203.0.113.9", tcp(5000, 22, SYN));
    if let Net::V4 { more_frags, .. } = &mut first.net {
        *more_frags = true;
    }
    cases.push(case(
        "first fragment is judged by its ports",
        first,
        Action::Drop,
        Reason::NotAllowed,
    ));

    let ext = |n: usize| {
        let mut s = FrameSpec::v6(v6(2), GW6, tcp(1234, 22, SYN));
        if let Net::V6 { ext, .. } = &mut s.net {
            *ext = (0..n)
                .map(|i| ([0u8, 60, 43, 60, 51, 60][i % 6], vec![0u8; 6]))
                .collect();
            ext[0].0 = 0;
        }
        s
    };
    cases.push(case(
        "ipv6 extension chain of six",
        ext(6),
        Action::Pass,
        Reason::Whitelisted,
    ));
    cases.push(case(
        "ipv6 extension chain of seven",
        ext(7),
        Action::Drop,
        Reason::Malformed,
    ));
    let mut frag6 = FrameSpec::v6(
        v6(9),
        GW6,
        L4::Raw {
            proto: proto::UDP,
            bytes: vec![0; 24],
        },
    );
    if let Net::V6 { ext, .. } = &mut frag6.net {
        *ext = vec![(44, vec![0, 9, 1])];
    }
    cases.push(case(
        "ipv6 non-first fragment, stranger",
        frag6,
        Action::Drop,
        Reason::FragmentUnmatched,
    ));

    let mut short_tcp = v4("10.0.0.2", tcp(40000, 22, SYN)).build();
    short_tcp.truncate(14 + 20 + 10);
    cases.push(Case {
        name: "truncated tcp header",
        frame: short_tcp,
        action: Action::Drop,
        reason: Reason::Malformed,
    });
    let mut lying = v4("10.0.0.2", tcp(40000, 22, SYN)).build();
    lying[16] = 0x05;
    cases.push(Case {
        name: "ip total length beyond the frame",
        frame: lying,
        action: Action::Drop,
        reason: Reason::Malformed,
    });
    let mut bad_ihl = v4("10.0.0.2", tcp(40000, 22, SYN)).build();
    bad_ihl[14] = 0x44;
    cases.push(Case {
        name: "ihl below five",
        frame: bad_ihl,
        action: Action::Drop,
        reason: Reason::Malformed,
    });
    cases.push(Case {
        name: "ethernet header only",
        frame: vec![0x02; 14],
        action: Action::Pass,
        reason: Reason::NotIp,
    });
    let mut eth_ip_nothing = vec![0u8; 14];
    eth_ip_nothing[12..14].copy_from_slice(&frames::ETH_P_IP.to_be_bytes());
    cases.push(Case {
        name: "ipv4 ethertype, no header",
        frame: eth_ip_nothing,
        action: Action::Drop,
        reason: Reason::Malformed,
    });
    cases
}

/// With fwknop clients enrolled, base64 text on the knock port is handed
/// over (v1 knocks still go their way); short text and other bytes are
/// dropped, and text elsewhere is nothing special. fwknop's raw carriers
/// (a SYN to the knock port, echo requests and replies) are handed over
/// when they carry such text, and go their usual way when they do not. The real program and
/// the model agree, and the handed-over packet reaches the ring whole.
#[test]
fn fwknop_text_on_the_knock_port_is_handed_over() -> Result<()> {
    use Action::{Divert, Drop, Pass};
    let mut model = standard_model(0);
    model.config.flags |= CFG_FWKNOP;
    let mut h = Harness::new(model)?;
    let text = |n: usize| -> Vec<u8> { (0..n).map(|i| b"AZaz09+/"[i % 8]).collect() };
    let mut binary = text(200);
    binary[1] = b'{';
    let cases = [
        (
            "fwknop packet",
            udp(5000, 62201, &text(knock::FWKNOP_MIN_LEN)),
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "fwknop at the length cap",
            udp(5000, 62201, &text(knock::MAX_LEN)),
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "too short for fwknop",
            udp(5000, 62201, &text(knock::FWKNOP_MIN_LEN - 1)),
            Drop,
            Reason::KnockBadLength,
        ),
        (
            "too long for fwknop",
            udp(5000, 62201, &text(knock::MAX_LEN + 1)),
            Drop,
            Reason::KnockBadLength,
        ),
        ("not base64", udp(5000, 62201, &binary), Drop, Reason::Malformed),
        (
            "a v1 knock still",
            udp(5000, 62201, &knock_payload(100)),
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "text to another protected port",
            udp(5000, 53, &text(200)),
            Drop,
            Reason::NotAllowed,
        ),
        (
            "-P tcpraw: a SYN with the packet to the knock port",
            L4::Tcp {
                sport: 5000,
                dport: 62201,
                flags: SYN,
                payload: text(300),
            },
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "a SYN with the packet to another port",
            L4::Tcp {
                sport: 5000,
                dport: 22,
                flags: SYN,
                payload: text(300),
            },
            Drop,
            Reason::NotAllowed,
        ),
        (
            "-P tcp: the packet inside a connection is the listener's",
            L4::Tcp {
                sport: 5000,
                dport: 62201,
                flags: ACK | PSH,
                payload: text(300),
            },
            Pass,
            Reason::Unprotected,
        ),
        (
            "-P icmp: an echo reply with the packet",
            L4::Icmp {
                typ: 0,
                payload: text(300),
            },
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "--icmp-type 8: an echo request with the packet",
            L4::Icmp {
                typ: 8,
                payload: text(300),
            },
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "a ping's reply",
            L4::Icmp {
                typ: 0,
                payload: vec![7; 56],
            },
            Pass,
            Reason::IcmpControl,
        ),
    ];
    for (i, (name, l4, action, reason)) in cases.into_iter().enumerate() {
        // A source each: the per-source bucket never runs dry here.
        let frame = v4(&format!("203.0.113.{}", 100 + i), l4).build();
        let (model, kernel) = h.both(&frame)?;
        assert_eq!((model.action, model.reason), (action, reason), "{name}: the model");
        assert_eq!(kernel, xdp_code(action), "{name}: the program");
    }
    let handed = h.drain_events()?;
    assert!(
        handed.iter().filter(|p| **p == text(300)).count() == 3,
        "the SYN's and the echoes' packets arrive: {:?}",
        handed.iter().map(|p| (p.len(), p.get(..4))).collect::<Vec<_>>()
    );
    assert!(
        handed.contains(&text(knock::MAX_LEN)),
        "the longest packet arrives whole"
    );
    Ok(())
}

/// v2 knocks carry no key id: the program lets through those whose flood
/// tag one of KNOCK_TAG_KEYS made (current or previous), after the
/// replay cache and the buckets, and drops the rest as an unknown key.
#[test]
fn v2_knocks_pass_the_gate_by_their_flood_tag() -> Result<()> {
    use Action::{Divert, Drop};
    let (current, previous, other) = ([1, 2], [3, 4], [5, 6]);
    let mut model = standard_model(0);
    model.tag_keys = [current, previous];
    let replayed = knock_v2_payload(200, current, 9);
    model.replay.insert(replayed[replayed.len() - 24..].try_into()?);
    let mut h = Harness::new(model)?;
    let mut forged = knock_v2_payload(200, current, 1);
    forged[knock::V2_TAG_AT] ^= 1;
    let cases = [
        (
            "tagged under the current key",
            knock_v2_payload(200, current, 1),
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "tagged under the previous key",
            knock_v2_payload(300, previous, 2),
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "at the length cap",
            knock_v2_payload(knock::MAX_LEN, current, 3),
            Divert,
            Reason::KnockDiverted,
        ),
        (
            "tagged under a key nobody holds",
            knock_v2_payload(200, other, 4),
            Drop,
            Reason::KnockUnknownKey,
        ),
        ("a flipped tag bit", forged, Drop, Reason::KnockUnknownKey),
        ("its nonce in the replay cache", replayed, Drop, Reason::KnockReplayed),
        (
            "too short",
            knock_v2_payload(knock::V2_MIN_LEN, current, 5)[..knock::V2_MIN_LEN - 1].to_vec(),
            Drop,
            Reason::KnockBadLength,
        ),
    ];
    for (i, (name, payload, action, reason)) in cases.into_iter().enumerate() {
        let frame = v4(&format!("203.0.113.{}", 100 + i), udp(5000, 62201, &payload)).build();
        let (model, kernel) = h.both(&frame)?;
        assert_eq!((model.action, model.reason), (action, reason), "{name}: the model");
        assert_eq!(kernel, xdp_code(action), "{name}: the program");
    }
    // In a SYN to a protected port and in an echo request, as v1 rides.
    let syn = L4::Tcp {
        sport: 5000,
        dport: 22,
        flags: SYN,
        payload: knock_v2_payload(200, current, 7),
    };
    let echo = L4::Icmp {
        typ: 8,
        payload: knock_v2_payload(200, current, 8),
    };
    for (name, l4) in [("in a SYN", syn), ("in an echo request", echo)] {
        let (model, kernel) = h.both(&v4("203.0.113.50", l4).build())?;
        assert_eq!(
            (model.action, model.reason),
            (Divert, Reason::KnockDiverted),
            "{name}: the model"
        );
        assert_eq!(kernel, xdp_code(Divert), "{name}: the program");
    }
    assert_eq!(h.drain_events()?.len(), 5, "what was diverted reached the ring");
    Ok(())
}

#[test]
fn hand_written_frames_get_the_verdicts_spelled_out() -> Result<()> {
    let mut h = Harness::new(standard_model(0))?;
    let mut failures = Vec::new();
    for c in hand_written_cases() {
        let before = h.stats()?;
        let (model, kernel) = h.both(&c.frame)?;
        let after = h.stats()?;
        let moved: Vec<Reason> = Reason::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a > b)
            .map(|(r, _)| *r)
            .collect();
        if model.action != c.action || model.reason != c.reason {
            failures.push(format!(
                "{}: model says {:?}/{:?}, expected {:?}/{:?}",
                c.name, model.action, model.reason, c.action, c.reason
            ));
        }
        if kernel != xdp_code(c.action) {
            failures.push(format!(
                "{}: XDP returned {kernel}, expected {}",
                c.name,
                xdp_code(c.action)
            ));
        }
        if moved != vec![c.reason] {
            failures.push(format!(
                "{}: counters moved {moved:?}, expected [{:?}]",
                c.name, c.reason
            ));
        }
        if c.action == Action::Divert {
            let events = h.drain_events()?;
            let payload = &c.frame[c.frame.len() - events.first().map_or(0, Vec::len)..];
            if events.len() != 1 || events[0] != payload {
                failures.push(format!(
                    "{}: expected one event with the knock payload, got {} events",
                    c.name,
                    events.len()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn knock_floods_are_rate_limited_per_source() -> Result<()> {
    let mut h = Harness::new(standard_model(0))?;
    let knock = |src: &str| v4(src, udp(5000, 53, &knock_payload(80))).build();
    let mut diverted = 0;
    for _ in 0..20 {
        let (d, code) = h.both(&knock("198.51.100.1"))?;
        assert_eq!(code, XDP_DROP);
        diverted += (d.action == Action::Divert) as u32;
    }
    assert_eq!(diverted, 5, "burst of 5, no refill");
    let (d, _) = h.both(&knock("198.51.100.2"))?;
    assert_eq!(d.action, Action::Divert, "another source has its own bucket");
    let stats = h.gate.stats()?;
    let count = |r: Reason| stats.iter().find(|(x, _)| *x == r).map(|(_, v)| *v).unwrap_or(0);
    assert_eq!(count(Reason::KnockRateLimited), 15);
    assert_eq!(count(Reason::KnockDiverted), 6);
    assert_eq!(h.drain_events()?.len(), 6, "only admitted knocks reach the daemon");
    Ok(())
}

/// Pins the calling thread to one CPU, so every test run meets the same
/// per-CPU knock budget.
fn stay_on_one_cpu() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0, ...) acts
    // on the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn a_spoofed_flood_dies_at_the_key_and_budget_limits() -> Result<()> {
    stay_on_one_cpu()?;
    let mut model = standard_model(0);
    model.config.knock_key_burst = 3;
    model.config.knock_budget_burst = 5;
    model.enroll(knock_key_id());
    let mut other = knock_key_id();
    other[0] ^= 0x55;
    model.enroll(other);
    model.budget.set(gatekeeper_common::ratelimit::full(5, 0));
    let mut h = Harness::new(model)?;
    // Every knock from a fresh source, as a spoofing flood sends them.
    let knock = |i: u32, key: [u8; 16]| {
        let mut p = knock_payload(90);
        p[knock::PREFIX.len()..knock::PREFIX.len() + 16].copy_from_slice(&key);
        FrameSpec::v4([198, 18, (i >> 8) as u8, i as u8], GW4, udp(5000, 62201, &p)).build()
    };
    let mut outcome = Vec::new();
    for i in 0..6 {
        let (d, code) = h.both(&knock(i, knock_key_id()))?;
        assert_eq!(code, XDP_DROP);
        outcome.push(d.reason);
    }
    assert_eq!(
        outcome[..4],
        [
            Reason::KnockDiverted,
            Reason::KnockDiverted,
            Reason::KnockDiverted,
            Reason::KnockKeyRateLimited
        ],
        "one key's bucket runs dry whatever the sources: {outcome:?}"
    );
    let (d, _) = h.both(&knock(100, other))?;
    assert_eq!(d.reason, Reason::KnockDiverted, "another key still gets through");
    let (d, _) = h.both(&knock(101, other))?;
    assert_eq!(d.reason, Reason::KnockDiverted);
    let (d, _) = h.both(&knock(102, other))?;
    assert_eq!(
        d.reason,
        Reason::KnockOverBudget,
        "the CPU's budget caps every key together"
    );
    let stats = h.gate.stats()?;
    let count = |r: Reason| stats.iter().find(|(x, _)| *x == r).map(|(_, v)| *v).unwrap_or(0);
    assert_eq!(
        (
            count(Reason::KnockDiverted),
            count(Reason::KnockKeyRateLimited),
            count(Reason::KnockOverBudget)
        ),
        (5, 3, 1)
    );
    assert_eq!(
        h.drain_events()?.len(),
        5,
        "only knocks inside every limit reach the daemon"
    );
    Ok(())
}

#[test]
fn traffic_refreshes_last_seen() -> Result<()> {
    let mut h = Harness::new(standard_model(0))?;
    let key = WhitelistKey::new(addr("10.0.0.3"), 0, proto::TCP);
    let before = h
        .gate
        .whitelist()?
        .into_iter()
        .find(|e| e.key == key)
        .expect("entry installed")
        .value;
    assert_eq!(before.last_seen_ns, 0);
    let start = clock::now_ns();
    assert_eq!(h.run(&v4("10.0.0.3", tcp(1234, 8000, ACK)).build())?, XDP_PASS);
    let after = h
        .gate
        .whitelist()?
        .into_iter()
        .find(|e| e.key == key)
        .expect("entry still there")
        .value;
    assert!(
        after.last_seen_ns >= start,
        "last_seen {} not refreshed (start {start})",
        after.last_seen_ns
    );
    Ok(())
}

fn pools() -> Pools {
    let v4 = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("address").octets();
    Pools {
        v4_sources: [
            "10.0.0.2",
            "10.0.0.3",
            "10.0.0.4",
            "10.0.0.5",
            "10.0.0.6",
            "10.0.0.7",
            "10.0.0.8",
            "192.168.50.9",
            "172.16.1.1",
            "203.0.113.9",
        ]
        .iter()
        .map(|s| v4(s))
        .collect(),
        v6_sources: vec![v6(2), v6(3), v6(9)],
        v4_dst: GW4,
        v6_dst: GW6,
        ports: vec![
            22, 53, 80, 443, 5353, 8000, 8050, 8100, 8101, 40000, 62201, 33000, 61000,
        ],
    }
}

/// Frames per generated run; `GK_VERDICT_FRAMES` raises it for a long run.
fn generated_frames() -> usize {
    std::env::var("GK_VERDICT_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn differential(mode: u32, seed: u64, min_outcomes: usize) -> Result<()> {
    differential_on(Harness::new(standard_model(mode))?, seed, min_outcomes)
}

/// Runs generated frames through `h`'s program and its model: whole, or
/// for a bare-IP instance with the Ethernet header cut off (VLAN tags and
/// ARP then read as broken IP).
fn differential_on(mut h: Harness, seed: u64, min_outcomes: usize) -> Result<()> {
    let mut generator = Generator::new(seed, pools());
    let before = h.stats()?;
    let mut expected = vec![0u64; Reason::COUNT];
    let mut disagreements = Vec::new();
    let n = generated_frames();
    for i in 0..n {
        let mut frame = generator.frame();
        if h.bare_ip {
            frame.drain(..14.min(frame.len()));
            // The kernel's test run takes no input shorter than a frame header.
            if frame.len() < 14 {
                continue;
            }
        }
        let (want, got) = h.both(&frame)?;
        expected[want.counter() as usize] += 1;
        if got != xdp_code(want.action) {
            disagreements.push(format!(
                "frame {i}: model {:?}/{:?}, XDP {got}: {:02x?}",
                want.action, want.reason, frame
            ));
        }
        if i % 500 == 0 {
            h.drain_events()?;
        }
    }
    let after = h.stats()?;
    let kernel: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        disagreements.is_empty(),
        "{} of {n} frames disagree (seed {seed}); first ones:\n{}",
        disagreements.len(),
        disagreements.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(
        kernel,
        expected,
        "per-reason counters differ (kernel vs model), order {:?}",
        Reason::ALL
    );
    let exercised = expected.iter().filter(|&&c| c > 0).count();
    assert!(
        exercised >= min_outcomes,
        "the generator reached only {exercised} outcomes: {expected:?}"
    );
    println!("{n} generated frames, 0 disagreements; outcomes: {expected:?}");
    Ok(())
}

#[test]
fn generated_frames_agree_with_the_model_in_enforce_mode() -> Result<()> {
    differential(0, 0x5eed_0001, 12)
}

#[test]
fn generated_frames_agree_with_the_model_in_audit_mode() -> Result<()> {
    // Every denial becomes audit_would_drop here.
    differential(MODE_AUDIT, 0x5eed_0002, 8)
}

#[test]
fn bare_ip_packets_agree_with_the_model() -> Result<()> {
    // The instance a tunnel device gets, in its own counter slot.
    let instance = loader::Instance { slot: 3, bare_ip: true };
    differential_on(Harness::with(standard_model(0), instance)?, 0x5eed_0003, 10)
}

#[test]
fn audit_mode_passes_what_enforce_drops_and_counts_it() -> Result<()> {
    let mut h = Harness::new(standard_model(MODE_AUDIT))?;
    let stranger = v4("203.0.113.9", tcp(5000, 22, SYN)).build();
    let (d, code) = h.both(&stranger)?;
    assert_eq!((d.action, d.reason, code), (Action::Pass, Reason::NotAllowed, XDP_PASS));
    let stats = h.gate.stats()?;
    assert!(stats.contains(&(Reason::AuditWouldDrop, 1)), "{stats:?}");
    assert!(stats.contains(&(Reason::NotAllowed, 0)), "{stats:?}");
    // Knocks are still taken out of the stream in audit mode.
    let (d, code) = h.both(&v4("203.0.113.9", udp(1, 53, &knock_payload(70))).build())?;
    assert_eq!((d.action, code), (Action::Divert, XDP_DROP));
    std::thread::sleep(Duration::from_millis(1));
    Ok(())
}

#[test]
fn a_full_replay_cache_says_it_is_full() -> Result<()> {
    let pins = Pins::new()?;
    let _ebpf = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())?;
    let gate = Gate::open(pins.dir())?;
    let n = gatekeeper_common::maps::REPLAY_MAX as usize;
    for i in 0..n {
        let mut nonce = [0u8; 24];
        nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
        assert!(gate.replay_record(&nonce, u64::MAX)?, "nonce {i} is new");
    }
    let e = gate.replay_record(&[0xff; 24], u64::MAX).unwrap_err();
    assert!(
        matches!(e, gatekeeper::gate::GateError::ReplayFull),
        "a full cache is told apart from other failures: {e}"
    );
    let mut seen = [0u8; 24];
    seen[..8].copy_from_slice(&7u64.to_le_bytes());
    assert!(
        !gate.replay_record(&seen, u64::MAX)?,
        "a nonce already there is still a replay"
    );
    Ok(())
}

#[test]
fn presence_counts_each_entry_once_whoever_writes_it() -> Result<()> {
    let pins = Pins::new()?;
    let _ebpf = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())?;
    let (one, other) = (Gate::open(pins.dir())?, Gate::open(pins.dir())?);
    let src = addr("198.51.100.4");
    let exact = WhitelistKey::new(src, 40000, proto::TCP);
    let any = WhitelistKey::new(src, 0, proto::TCP);
    let value = WhitelistValue::new(u64::MAX, 22, 22, 0, 0);
    one.whitelist_insert(&exact, &value)?;
    // An update through another handle, as the CLI beside the daemon.
    other.whitelist_insert(&exact, &value)?;
    one.whitelist_insert(&any, &value)?;
    assert_eq!(
        one.presence()?.count(&src),
        PresenceCount::new(1, 1),
        "two entries, one count each, by kind"
    );
    other.whitelist_del(&gatekeeper::gate::key_tuple(&exact).context("a tcp key")?)?;
    assert_eq!(one.presence()?.count(&src), PresenceCount::new(0, 1));
    assert_eq!(one.whitelist_flush()?, 1);
    assert_eq!(
        one.presence()?.count(&src),
        PresenceCount::default(),
        "nothing left to look up for this source"
    );
    Ok(())
}

/// Creates a map by hand and pins it at `path`, as an older release left
/// its maps: `map_type` is the kernel's BPF_MAP_TYPE_* number.
fn pin_raw_map(path: &std::path::Path, map_type: u32, key: u32, value: u32, entries: u32, flags: u32) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // The leading fields of `union bpf_attr` for BPF_MAP_CREATE and BPF_OBJ_PIN.
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let create = Create {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: flags,
    };
    // SAFETY: the bpf syscall reads `size` bytes of a valid attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &create as *const Create,
            std::mem::size_of::<Create>(),
        )
    };
    anyhow::ensure!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let pin = Pin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: as above; `name` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, &pin as *const Pin, std::mem::size_of::<Pin>()) };
    let pinned = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor this function opened.
    unsafe { libc::close(fd as i32) };
    anyhow::ensure!(rc == 0, "BPF_OBJ_PIN {}: {pinned}", path.display());
    Ok(())
}

#[test]
fn a_gate_pinned_by_an_older_release_is_adopted_or_refused_by_name() -> Result<()> {
    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;
    const LRU_HASH: u32 = 9;
    let pins = Pins::new()?;
    let entry = WhitelistKey::new(addr("10.0.0.9"), 0, proto::TCP);
    let exact = WhitelistKey::new(entry.addr, 40000, proto::TCP);
    {
        let _ebpf = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())?;
        let gate = Gate::open(pins.dir())?;
        for key in [&entry, &exact] {
            gate.whitelist_insert(key, &WhitelistValue::new(u64::MAX, 22, 22, 0, 0))?;
        }
    }
    let one_of_each = PresenceCount::new(1, 1);
    // What the previous release pinned: a 40-byte config, 15 counters, and
    // no PRESENCE counters at all.
    for (name, map_type, value, entries) in [("CONFIG", ARRAY, 40, 1), ("STATS", PERCPU_ARRAY, 8, 15)] {
        std::fs::remove_file(pins.dir().join(name))?;
        pin_raw_map(&pins.dir().join(name), map_type, 4, value, entries, 0)?;
    }
    std::fs::remove_file(pins.dir().join("PRESENCE"))?;
    {
        let _ebpf = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())?;
        let gate = Gate::open(pins.dir())?;
        assert!(gate.whitelist_get(&entry)?.is_some(), "the entries were carried over");
        assert_eq!(
            gate.presence()?.count(&entry.addr),
            one_of_each,
            "the carried-over entries are counted, so their source is no stranger"
        );
        gate.set_config(&standard_model(0).config)?;
        assert_eq!(gate.stats()?.len(), Reason::COUNT, "every counter exists again");
    }
    // The release before counted every entry in one number, in 2^18
    // slots: replaced, and the entries counted by kind.
    std::fs::remove_file(pins.dir().join("PRESENCE"))?;
    pin_raw_map(&pins.dir().join("PRESENCE"), ARRAY, 4, 8, 1 << 18, BPF_F_MMAPABLE)?;
    {
        let _ebpf = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())?;
        assert_eq!(
            Gate::open(pins.dir())?.presence()?.count(&entry.addr),
            one_of_each,
            "the single-count PRESENCE was replaced and the entries counted by kind"
        );
    }
    // A whitelist of another layout cannot be carried over: refused, by name.
    std::fs::remove_file(pins.dir().join("WHITELIST"))?;
    pin_raw_map(&pins.dir().join("WHITELIST"), LRU_HASH, 20, 32, 65536, 0)?;
    let e = loader::load_pinned(pins.dir(), 65536, loader::Instance::default())
        .err()
        .context("must be refused")?;
    let text = e.to_string();
    assert!(
        text.contains("WHITELIST") && text.contains("value 32 B") && text.contains("detach"),
        "{text}"
    );
    Ok(())
}
