//! A node's public side: each visitor's requests, routed by `Host` to
//! the agent that publishes that host, carried through Redis, answered
//! with the agent's response or one of the relay's own pages.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use gatekeeper_common::{maps::WhitelistKey, proto};
use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Incoming},
    header::{self, HeaderName, HeaderValue},
};
use tokio::sync::oneshot;

use super::{Exchange, Shared, ToAgent};
use crate::{
    gate::Gate,
    relay::{
        flow::{Credit, Inflow, MAX_REQUESTS, Outbox, RelayBody, carry, full, pump},
        wire::{Head, Message},
    },
    spec::{format_duration, map_addr},
};

impl Shared {
    /// Who let `visitor` in: the owners of the gate's entries for its
    /// address (from its port, or any), each a client's id, or 0 for an
    /// operator's entry. Asked once per connection.
    pub(super) fn owners_of(&self, visitor: SocketAddr) -> Vec<u32> {
        let Ok(gate) = Gate::open(&self.pin_dir) else {
            return Vec::new();
        };
        [visitor.port(), 0]
            .into_iter()
            .filter_map(|port| {
                let key = WhitelistKey::new(map_addr(visitor.ip()), port, proto::TCP);
                gate.whitelist_get(&key).ok().flatten()
            })
            .map(|entry| entry.owner)
            .collect()
    }

    /// One visitor's request: routed by host, relayed, answered.
    pub(super) async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        visitor: SocketAddr,
        proto: &'static str,
        owners: &[u32],
    ) -> Response<RelayBody> {
        let Some(host) = host_of(&req) else {
            return page(StatusCode::BAD_REQUEST, "No host", "The request names no host.");
        };
        let agent = {
            let state = self.lock();
            let Some(name) = state.hosts.get(&host).cloned() else {
                return page(
                    StatusCode::NOT_FOUND,
                    "Not found",
                    &format!("No service is published at {} here.", escape(&host)),
                );
            };
            // Every relay's host shares the port: a visitor reaches only
            // those of the relays that allow the client it knocked as.
            let allowed = owners.contains(&0)
                || state.records.get(&name).is_some_and(|r| {
                    r.allow
                        .iter()
                        .filter_map(|c| state.client_ids.get(c))
                        .any(|id| owners.contains(id))
                });
            if !allowed {
                return page(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("You have not knocked as a client that {host} allows."),
                );
            }
            let ready = state.agents.get(&name).is_some_and(|l| l.sessions.is_some());
            if !ready {
                return page(
                    StatusCode::BAD_GATEWAY,
                    "Not connected",
                    &format!(
                        "The service at {host} is not connected right now: its agent is not talking to this gateway."
                    ),
                );
            }
            name
        };
        let timeout = self.settings.response_timeout;
        let Ok(Ok(slot)) = tokio::time::timeout(timeout, self.slots.clone().acquire_owned()).await else {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                &format!("This gateway has {MAX_REQUESTS} requests in flight; try again shortly."),
            );
        };
        let out: Arc<dyn Outbox> = Arc::new(ToAgent {
            shared: self.clone(),
            agent: agent.clone(),
        });
        let (head_tx, head_rx) = oneshot::channel();
        let credit = Credit::new(0);
        let (id, body, window) = {
            let mut state = self.lock();
            state.next_id += 1;
            let id = state.next_id;
            let (ended, tell) = (Arc::downgrade(&self), out.clone());
            let (feed, body, window) = Inflow::new(id, out.clone(), &self.budget, move |finished| {
                drop(slot);
                if let Some(shared) = ended.upgrade()
                    && let Some(ex) = shared.lock().exchanges.remove(&id)
                {
                    ex.credit.close();
                }
                // The visitor went away: the agent stops sending.
                if !finished {
                    tell.send(Message::Reset {
                        id,
                        reason: "the visitor went away".into(),
                    });
                }
            });
            state.exchanges.insert(
                id,
                Exchange {
                    agent: agent.clone(),
                    heard: Instant::now(),
                    head: Some(head_tx),
                    feed,
                    credit: credit.clone(),
                },
            );
            (id, body, window)
        };
        let has_body = !req.body().is_end_stream();
        let upgrade = upgrade_of(req.headers());
        let upgrading = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let head = request_head(&req, &host, visitor, proto, upgrade.as_ref());
        let request = Message::Request {
            id,
            head,
            body: has_body,
            window,
        };
        if request.encode().is_none() {
            return page(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Headers too large",
                "The request's headers are too large to relay.",
            );
        }
        out.send(request);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if has_body {
            tokio::spawn(pump(
                req.into_body().into_data_stream(),
                id,
                credit.clone(),
                out.clone(),
            ));
        }
        let head = match tokio::time::timeout(timeout, head_rx).await {
            Ok(Ok(Ok(head))) => head,
            Ok(Ok(Err(why))) => {
                return page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    &format!("The service at {host} did not answer: {}.", escape(&why)),
                );
            }
            Ok(Err(_)) => {
                return page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    &format!("The service at {host} did not answer."),
                );
            }
            Err(_) => {
                return page(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Gateway timeout",
                    &format!(
                        "The service at {host} did not answer within {}.",
                        format_duration(timeout)
                    ),
                );
            }
        };
        if head.status == StatusCode::SWITCHING_PROTOCOLS.as_u16()
            && let (Some(upgrading), Some(protocol)) = (upgrading, upgrade)
        {
            // The agent's side switched: carry bytes both ways from now on.
            let protocol = head
                .headers
                .iter()
                .find(|(n, _)| n == "upgrade")
                .and_then(|(_, v)| HeaderValue::from_bytes(v).ok())
                .unwrap_or(protocol);
            tokio::spawn(carry(upgrading, id, credit, out, body));
            let mut resp = response(head, full(""));
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert(header::UPGRADE, protocol);
            return resp;
        }
        response(head, body.boxed())
    }
}

/// The protocol a request asks to switch to: its `Upgrade`, when its
/// `Connection` names it.
fn upgrade_of(headers: &hyper::HeaderMap) -> Option<HeaderValue> {
    connection_listed(headers)
        .iter()
        .any(|t| t == "upgrade")
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// The host a request asks for, lower case and without a port.
fn host_of(req: &Request<Incoming>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h.to_string(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_string(),
    };
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw.as_str(),
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || listed.iter().any(|l| l == name.as_str())
}

/// The headers a `Connection` header names.
fn connection_listed(headers: &hyper::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect()
}

/// The request as the agent replays it, with the visitor's address in
/// `Forwarded` and `X-Forwarded-For`, and the upgrade it asks for (the one
/// hop-by-hop header that must reach the service).
fn request_head(
    req: &Request<Incoming>,
    host: &str,
    visitor: SocketAddr,
    proto: &str,
    upgrade: Option<&HeaderValue>,
) -> Head {
    let listed = connection_listed(req.headers());
    let mut headers: Vec<(String, Vec<u8>)> = req
        .headers()
        .iter()
        .filter(|(name, _)| !hop_by_hop(name, &listed) && *name != "forwarded")
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect();
    let ip = visitor.ip();
    let xff = match req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {ip}"),
        None => ip.to_string(),
    };
    headers.retain(|(name, _)| name != "x-forwarded-for");
    let node = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    if let Some(protocol) = upgrade {
        headers.push(("connection".into(), b"upgrade".to_vec()));
        headers.push(("upgrade".into(), protocol.as_bytes().to_vec()));
    }
    headers.push(("x-forwarded-for".into(), xff.into_bytes()));
    headers.push((
        "forwarded".into(),
        format!("for={node};host={host};proto={proto}").into_bytes(),
    ));
    Head {
        method: req.method().as_str().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        status: 0,
        headers,
    }
}

/// The agent's response, for the visitor.
fn response(head: Head, body: RelayBody) -> Response<RelayBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = resp.headers_mut();
    for (name, value) in head.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value))
            && !hop_by_hop(&name, &[])
        {
            headers.append(name, value);
        }
    }
    resp
}

/// A page of the relay's own, for visitors.
fn page(status: StatusCode, title: &str, text: &str) -> Response<RelayBody> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} {title}</title></head>\n<body><h1>{title}</h1><p>{text}</p></body></html>\n"
    );
    let mut resp = Response::new(full(html));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// `text` safe inside HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
