//! The guidance page: what everyone without a valid knock gets, whatever
//! they ask for.
//!
//! The page is built once, at start: `index.html` from the operator's
//! folder (or the one shipped in `gatekeeper/guidance/`) with every
//! stylesheet, script and image it refers to inlined as a `data:` URL, CSS
//! `url(...)`s included. One self-contained response then serves every path
//! and method byte for byte, so the portal never touches the file system or
//! parses a request path for a stranger, and the answer says nothing about
//! what a path might have meant.
//!
//! Client downloads (`[portal.downloads]`) are written where the page has
//! the comment [`DOWNLOADS_MARK`]; a page without it cannot carry them,
//! and says so at start.
//!
//! A browser that negotiated HTTP/2 (ALPN `h2`) gets the same page and
//! headers over it, from hyper; every other visitor gets the HTTP/1.1
//! bytes.

use std::{
    io,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, header::HeaderValue, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::timeout,
};

use crate::store::config::Download;

/// The page that ships with the project, used when no folder is configured.
const BUILT_IN: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../../guidance/index.html")),
    ("style.css", include_bytes!("../../guidance/style.css")),
    ("guidance.js", include_bytes!("../../guidance/guidance.js")),
    ("gate.svg", include_bytes!("../../guidance/gate.svg")),
];

/// Where the page lists the client downloads.
pub const DOWNLOADS_MARK: &str = "<!-- gatekeeper:downloads -->";

/// A page that inlines more than this is refused at start.
const MAX_PAGE: usize = 4 << 20;
/// How much of a request head the portal reads before answering anyway.
const MAX_REQUEST_HEAD: usize = 16 << 10;
/// How long a visitor may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum GuidanceError {
    #[error(
        "guidance folder {dir}: reading {file}: {error}; the folder needs an index.html and every file it refers to"
    )]
    Read {
        dir: PathBuf,
        file: String,
        error: io::Error,
    },
    #[error(
        "guidance folder {dir}: {file} refers to {reference:?}, outside the folder; refer to files inside it by relative paths"
    )]
    Outside {
        dir: PathBuf,
        file: String,
        reference: String,
    },
    #[error(
        "guidance folder {dir}: the page with its files inlined is {size} bytes, more than {MAX_PAGE}; shrink the images"
    )]
    TooLarge { dir: PathBuf, size: usize },
    #[error("guidance folder {dir}: {file} is not UTF-8 text")]
    NotText { dir: PathBuf, file: String },
    #[error(
        "guidance folder {dir}: index.html has no {DOWNLOADS_MARK} where the [portal.downloads] links go; add it, or remove the downloads"
    )]
    NoDownloadsMark { dir: PathBuf },
}

/// The one response every unauthorized request gets.
#[derive(Clone, Debug)]
pub struct Guidance {
    /// Over HTTP/1.1: status line, headers and body, as sent.
    response: Vec<u8>,
    /// For HTTP/2: the same headers (but `Connection`) and body.
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

/// Where the page's files come from.
enum Source<'a> {
    Folder(&'a Path),
    BuiltIn,
}

impl Source<'_> {
    fn label(&self) -> PathBuf {
        match self {
            Source::Folder(dir) => dir.to_path_buf(),
            Source::BuiltIn => PathBuf::from("(built in)"),
        }
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, GuidanceError> {
        let found = match self {
            Source::Folder(dir) => std::fs::read(dir.join(name)),
            Source::BuiltIn => BUILT_IN
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, bytes)| bytes.to_vec())
                .ok_or_else(|| io::ErrorKind::NotFound.into()),
        };
        found.map_err(|error| GuidanceError::Read {
            dir: self.label(),
            file: name.to_string(),
            error,
        })
    }

    fn text(&self, name: &str) -> Result<String, GuidanceError> {
        String::from_utf8(self.read(name)?).map_err(|_| GuidanceError::NotText {
            dir: self.label(),
            file: name.to_string(),
        })
    }
}

impl Guidance {
    /// The page from `dir`, or the built-in one, linking to `downloads`;
    /// with `hsts`, browsers are told to use HTTPS alone for that long.
    pub fn load(dir: Option<&Path>, downloads: &[Download], hsts: Option<Duration>) -> Result<Guidance, GuidanceError> {
        let source = dir.map_or(Source::BuiltIn, Source::Folder);
        let html = source.text("index.html")?;
        let body = inline(&source, "index.html", &html, &["href=\"", "src=\"", "href='", "src='"])?;
        if !downloads.is_empty() && !body.contains(DOWNLOADS_MARK) {
            return Err(GuidanceError::NoDownloadsMark { dir: source.label() });
        }
        // After inlining: the links are never taken for assets.
        let body = body.replace(DOWNLOADS_MARK, &download_list(downloads));
        if body.len() > MAX_PAGE {
            return Err(GuidanceError::TooLarge {
                dir: source.label(),
                size: body.len(),
            });
        }
        let mut headers = vec![
            ("content-type", "text/html; charset=utf-8".to_string()),
            ("content-length", body.len().to_string()),
            ("cache-control", "no-store".into()),
            ("x-content-type-options", "nosniff".into()),
            ("referrer-policy", "no-referrer".into()),
        ];
        if let Some(age) = hsts {
            headers.push(("strict-transport-security", format!("max-age={}", age.as_secs())));
        }
        let mut head = String::from("HTTP/1.1 200 OK\r\n");
        for (name, value) in &headers {
            head.push_str(&format!("{}: {value}\r\n", title_case(name)));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut response = head.into_bytes();
        response.extend_from_slice(body.as_bytes());
        Ok(Guidance {
            response,
            headers,
            body: Bytes::from(body),
        })
    }

    /// The exact bytes every request is answered with.
    pub fn response(&self) -> &[u8] {
        &self.response
    }

    /// Answers one visitor: waits (bounded) for its request head, sends the
    /// page and closes. Whatever it asked, it gets the same bytes.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) -> io::Result<()> {
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        let _ = timeout(REQUEST_TIMEOUT, async {
            while head.len() < MAX_REQUEST_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        stream.write_all(&self.response).await?;
        stream.shutdown().await
    }

    /// Answers one visitor over HTTP/2: the page for every stream it
    /// opens, until it closes or [`REQUEST_TIMEOUT`] passes.
    pub async fn serve_h2<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(&self, stream: S) -> io::Result<()> {
        let page = self.clone();
        let service = service_fn(move |_request| {
            let mut response = Response::new(Full::new(page.body.clone()));
            for (name, value) in &page.headers {
                if let Ok(value) = HeaderValue::from_str(value) {
                    response.headers_mut().insert(*name, value);
                }
            }
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        });
        let connection = http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service);
        match timeout(REQUEST_TIMEOUT, connection).await {
            Ok(served) => served.map_err(io::Error::other),
            Err(_) => Ok(()),
        }
    }
}

/// `content-type` as `Content-Type`, as HTTP/1.1 peers are used to.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The downloads as HTML; nothing when there are none. Labels and URLs
/// were checked when the config was read to hold no markup.
fn download_list(downloads: &[Download]) -> String {
    if downloads.is_empty() {
        return String::new();
    }
    let items: String = downloads
        .iter()
        .map(|d| format!("<li><a href=\"{}\" rel=\"noreferrer\">{}</a></li>", d.url, d.platform))
        .collect();
    format!("<p>Download the client for your device:</p><ul class=\"downloads\">{items}</ul>")
}

/// `text` (the file `name`) with every local asset after one of `openers`
/// replaced by a `data:` URL.
fn inline(source: &Source<'_>, name: &str, text: &str, openers: &[&str]) -> Result<String, GuidanceError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = openers
            .iter()
            .filter_map(|o| rest.find(o).map(|at| (at, *o)))
            .min_by_key(|(at, _)| *at);
        let Some((at, opener)) = next else {
            out.push_str(rest);
            return Ok(out);
        };
        let value_start = at + opener.len();
        let close = match opener.as_bytes().last() {
            Some(b'(') => ')',
            Some(b'\'') => '\'',
            _ => '"',
        };
        out.push_str(&rest[..value_start]);
        let Some(len) = rest[value_start..].find(close) else {
            out.push_str(&rest[value_start..]);
            return Ok(out);
        };
        let reference = &rest[value_start..value_start + len];
        match data_url(source, name, reference.trim().trim_matches(['"', '\'']))? {
            Some(url) => out.push_str(&url),
            None => out.push_str(reference),
        }
        rest = &rest[value_start + len..];
    }
}

/// The media type of an asset we inline, by extension; `None` leaves the
/// reference alone (links to other pages, which get this page anyway).
fn media_type(reference: &str) -> Option<&'static str> {
    let ext = reference.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "css" => "text/css",
        "js" => "text/javascript",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        _ => return None,
    })
}

fn data_url(source: &Source<'_>, from: &str, reference: &str) -> Result<Option<String>, GuidanceError> {
    let external = reference.contains(':') || reference.starts_with("//") || reference.starts_with('#');
    // `style.css?v=2` is the file style.css.
    let reference = reference.split(['?', '#']).next().unwrap_or(reference);
    let Some(media) = media_type(reference).filter(|_| !external) else {
        return Ok(None);
    };
    let path = Path::new(reference);
    if !path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(GuidanceError::Outside {
            dir: source.label(),
            file: from.to_string(),
            reference: reference.to_string(),
        });
    }
    let bytes = if media == "text/css" {
        // A stylesheet's own images and fonts are inlined first.
        inline(source, reference, &source.text(reference)?, &["url("])?.into_bytes()
    } else {
        source.read(reference)?
    };
    Ok(Some(format!("data:{media};base64,{}", STANDARD.encode(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(tag: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gk-guidance-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    fn body(g: &Guidance) -> String {
        let text = String::from_utf8(g.response().to_vec()).unwrap();
        text.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    #[test]
    fn the_built_in_page_is_self_contained() {
        let g = Guidance::load(None, &[], None).unwrap();
        let b = body(&g);
        assert!(b.contains("This gateway is private"));
        assert!(b.contains("href=\"data:text/css;base64,"));
        assert!(b.contains("src=\"data:image/svg+xml;base64,"));
        assert!(b.contains("src=\"data:text/javascript;base64,"));
        assert!(!b.contains("style.css") && !b.contains("gate.svg"));
        let head = String::from_utf8_lossy(g.response());
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", b.len())));
        assert!(!head.contains("Strict-Transport-Security"), "no HSTS unless asked");
        let strict = Guidance::load(None, &[], Some(Duration::from_secs(86_400))).unwrap();
        let head = String::from_utf8_lossy(strict.response());
        assert!(
            head.contains("\r\nStrict-Transport-Security: max-age=86400\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn http2_visitors_get_the_same_page_and_headers() {
        let g = Guidance::load(None, &[], Some(Duration::from_secs(60))).unwrap();
        let (client, server) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn({
            let g = g.clone();
            async move { g.serve_h2(server).await }
        });
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        for path in ["/", "/admin/login?x=1"] {
            let request = hyper::Request::get(path)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["strict-transport-security"], "max-age=60");
            assert_eq!(response.headers()["content-type"], "text/html; charset=utf-8");
            let got = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(got, body(&g).as_bytes());
        }
        drop(sender);
        served.await.unwrap().unwrap();
    }

    #[test]
    fn stylesheets_have_their_own_assets_inlined() {
        let dir = folder(
            "css",
            &[
                (
                    "index.html",
                    "<link rel=stylesheet href='a.css?v=2'><a href=\"other.html\">x</a>",
                ),
                (
                    "a.css",
                    "body { background: url(\"bg.png\") } h1 { background: url(https://x/y.png) }",
                ),
                ("bg.png", "PNG"),
            ],
        );
        let b = body(&Guidance::load(Some(&dir), &[], None).unwrap());
        let css = b
            .split("data:text/css;base64,")
            .nth(1)
            .unwrap()
            .split('\'')
            .next()
            .unwrap();
        let css = String::from_utf8(STANDARD.decode(css).unwrap()).unwrap();
        assert!(css.contains(&format!("url(data:image/png;base64,{})", STANDARD.encode("PNG"))));
        assert!(css.contains("url(https://x/y.png)"), "external references stay");
        assert!(b.contains("href=\"other.html\""), "links to pages stay");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_folders_are_refused_by_name() {
        let dir = folder("missing", &[("index.html", "<img src=\"logo.png\">")]);
        let e = Guidance::load(Some(&dir), &[], None).unwrap_err().to_string();
        assert!(e.contains("logo.png"), "{e}");
        let dir2 = folder("outside", &[("index.html", "<img src=\"../secret.png\">")]);
        let e = Guidance::load(Some(&dir2), &[], None).unwrap_err().to_string();
        assert!(e.contains("outside the folder"), "{e}");
        let dir3 = folder("empty", &[]);
        let e = Guidance::load(Some(&dir3), &[], None).unwrap_err().to_string();
        assert!(e.contains("index.html"), "{e}");
        for d in [dir, dir2, dir3] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn downloads_are_listed_where_the_page_asks() {
        let downloads = [
            Download {
                platform: "Windows".into(),
                url: "https://dl.example/gk.exe".into(),
            },
            Download {
                platform: "macOS".into(),
                url: "https://dl.example/gk.svg".into(),
            },
        ];
        let b = body(&Guidance::load(None, &downloads, None).unwrap());
        assert!(
            b.contains("<a href=\"https://dl.example/gk.exe\" rel=\"noreferrer\">Windows</a>"),
            "{b}"
        );
        assert!(
            b.contains("href=\"https://dl.example/gk.svg\""),
            "a link is never inlined"
        );
        assert!(!b.contains(DOWNLOADS_MARK));
        let plain = body(&Guidance::load(None, &[], None).unwrap());
        assert!(!plain.contains(DOWNLOADS_MARK) && !plain.contains("class=\"downloads\""));

        let dir = folder("nomark", &[("index.html", "<h1>private</h1>")]);
        let e = Guidance::load(Some(&dir), &downloads, None).unwrap_err().to_string();
        assert!(e.contains(DOWNLOADS_MARK), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn every_request_gets_the_same_bytes() {
        let g = Guidance::load(None, &[], None).unwrap();
        let requests: [&[u8]; 4] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /admin/login?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            b"garbage without an end",
            b"",
        ];
        for request in requests {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            client.write_all(request).await.unwrap();
            if !request.ends_with(b"\r\n\r\n") && !request.ends_with(b"abc") {
                client.shutdown().await.unwrap();
            }
            g.serve(server).await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, g.response());
        }
    }
}
