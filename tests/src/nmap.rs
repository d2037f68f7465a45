//! Runs nmap from inside a lab namespace and reads its XML report.

use anyhow::Result;

use crate::lab::{Lab, Role};

/// Ports nmap reported, by state.
#[derive(Debug, Default)]
pub struct Scan {
    pub open: Vec<u16>,
    pub closed: Vec<u16>,
    /// `open|filtered` (UDP with no answer) and `filtered` ports nmap listed
    /// one by one; the rest of the filtered ports it only counts.
    pub other: Vec<(u16, String)>,
}

impl Scan {
    /// Ports in `lo..=hi` that nmap saw as open or closed, i.e. that answered.
    pub fn answered_in(&self, lo: u16, hi: u16) -> Vec<u16> {
        self.open
            .iter()
            .chain(&self.closed)
            .copied()
            .filter(|p| (lo..=hi).contains(p))
            .collect()
    }
}

/// Scans `target` from `from`: `-sS` (TCP SYN) or `-sU` (UDP) over `ports`.
/// Rates are fixed and retries bounded so a scan of all ports ends quickly.
pub fn scan(lab: &Lab, from: Role, kind: &str, ports: &str, target: &str) -> Result<Scan> {
    let out = lab.exec(
        from,
        &[
            "nmap",
            "-n",
            "-Pn",
            kind,
            "-p",
            ports,
            "--min-rate",
            "20000",
            "--max-retries",
            "1",
            "--host-timeout",
            "120s",
            "-oX",
            "-",
            target,
        ],
    )?;
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

fn parse(xml: &str) -> Scan {
    let mut scan = Scan::default();
    for chunk in xml.split("<port ").skip(1) {
        let Some(port) = attr(chunk, "portid").and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        let Some(state) = chunk.split("<state ").nth(1).and_then(|s| attr(s, "state")) else {
            continue;
        };
        match state {
            "open" => scan.open.push(port),
            "closed" => scan.closed.push(port),
            other => scan.other.push((port, other.to_string())),
        }
    }
    scan
}

fn attr<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let start = s.find(&format!("{name}=\""))? + name.len() + 2;
    let len = s[start..].find('"')?;
    Some(&s[start..start + len])
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_nmap_xml() {
        let xml = r#"<ports><extraports state="filtered" count="65533"/>
<port protocol="tcp" portid="80"><state state="open" reason="syn-ack"/></port>
<port protocol="tcp" portid="81"><state state="closed" reason="reset"/></port>
<port protocol="udp" portid="53"><state state="open|filtered" reason="no-response"/></port></ports>"#;
        let s = super::parse(xml);
        assert_eq!(s.open, vec![80]);
        assert_eq!(s.closed, vec![81]);
        assert_eq!(s.other, vec![(53, "open|filtered".to_string())]);
        assert_eq!(s.answered_in(1, 100), vec![80, 81]);
    }
}
