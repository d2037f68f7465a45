//! Prometheus metrics: `[metrics] listen` serves them in the OpenMetrics
//! text format at `/metrics` (series and their meaning: `docs/metrics.md`).
//!
//! Two kinds of figures, kept apart by where they come from:
//!
//! - [`Events`]: what happened, counted as it happens. The audit trail is
//!   where every knock, portal connection and tunnel or relay event is
//!   recorded, so [`crate::audit::Audit`] counts each one here as it
//!   queues its line, before any summarizing: a flood the audit file only
//!   summarizes is counted in full.
//! - [`exposition`]: what is, read at each scrape from the daemon's own
//!   status (the same answer `gatekeeper status` gets): the gate's
//!   counters per interface and outcome, entries live, clients, tunnels,
//!   the audit writer, the cluster and the relay.
//!
//! - [`server`]: the HTTP listener (hyper) that answers scrapes.

pub mod exposition;
pub mod server;

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KnockLabels {
    carrier: &'static str,
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
    result: String,
}

/// Knocks verified since the daemon started, by result, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnockTotals {
    pub accepted: u64,
    pub rejected: u64,
    /// Good knocks whose entry could not be written.
    pub failed: u64,
}

/// Counts of what happened since the daemon started.
pub struct Events {
    registry: Registry,
    knocks: Family<KnockLabels, Counter>,
    /// The same knocks by result alone: accepted, rejected, failed.
    totals: [AtomicU64; 3],
    knock_open: Histogram,
    portal: Family<DecisionLabels, Counter>,
    events: Family<EventLabels, Counter>,
}

impl Default for Events {
    fn default() -> Events {
        let knocks = Family::<KnockLabels, Counter>::default();
        // 50 us to 1.6 s: a knock opens in well under a millisecond, a
        // cluster's claim adds a Redis round trip, and anything near a
        // second is a daemon in trouble.
        let knock_open = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let portal = Family::<DecisionLabels, Counter>::default();
        let events = Family::<EventLabels, Counter>::default();
        let mut registry = Registry::with_prefix("gatekeeper");
        registry.register(
            "knocks",
            "Knocks the daemon verified, by carrier (udp, tcp, icmp, tls_client_hello), result (accepted, rejected, failed) and reason (empty when accepted)",
            knocks.clone(),
        );
        registry.register(
            "knock_open_seconds",
            "From the gate seeing an accepted knock to its entry being in the gate",
            knock_open.clone(),
        );
        registry.register(
            "portal_sessions",
            "Portal connections by where they were sent: upstream or guidance",
            portal.clone(),
        );
        registry.register(
            "audit_events",
            "Audited events other than knocks and portal connections (tunnel and relay sessions and connections, revocations, state problems), by event and its result or why",
            events.clone(),
        );
        Events {
            registry,
            knocks,
            totals: Default::default(),
            knock_open,
            portal,
            events,
        }
    }
}

impl Events {
    /// One knock and what came of it; `open_secs` for one that opened.
    pub fn knock(&self, carrier: &'static str, result: &'static str, reason: &'static str, open_secs: Option<f64>) {
        self.knocks
            .get_or_create(&KnockLabels {
                carrier,
                result,
                reason,
            })
            .inc();
        let slot = match result {
            "accepted" => 0,
            "rejected" => 1,
            _ => 2,
        };
        self.totals[slot].fetch_add(1, Ordering::Relaxed);
        if let Some(secs) = open_secs {
            self.knock_open.observe(secs);
        }
    }

    /// One portal connection, sent `upstream` or to the `guidance` page.
    pub fn portal(&self, decision: &'static str) {
        self.portal.get_or_create(&DecisionLabels { decision }).inc();
    }

    /// One audited event of another kind.
    pub fn event(&self, event: &str, result: &str) {
        self.events
            .get_or_create(&EventLabels {
                event: event.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn knock_totals(&self) -> KnockTotals {
        let [accepted, rejected, failed] = self.totals.each_ref().map(|n| n.load(Ordering::Relaxed));
        KnockTotals {
            accepted,
            rejected,
            failed,
        }
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }
}
