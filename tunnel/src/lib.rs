//! TLS reverse tunnel (server and agent). Filled by the tunnel issue.
