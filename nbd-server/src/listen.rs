//! Listen addresses: `HOST:PORT` (TCP, IPv6 as `[::1]:10809`) or `unix:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs a socket path, e.g. unix:/run/nbdmirror/disk0.sock".into(),
                );
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "'{s}' is not HOST:PORT or unix:PATH (e.g. 127.0.0.1:10809)"
            ));
        };
        if host.is_empty() {
            return Err(format!(
                "'{s}' has no host (use 0.0.0.0:{port} for all IPv4 addresses)"
            ));
        }
        port.parse::<u16>()
            .map_err(|_| format!("'{port}' in '{s}' is not a port number (0-65535)"))?;
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_unix_and_ipv6() {
        assert_eq!(
            "127.0.0.1:10809".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!(
            "[::1]:10809".parse(),
            Ok(ListenAddr::Tcp("[::1]:10809".into()))
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/x.sock".into()))
        );
    }

    #[test]
    fn rejects_missing_port_and_path() {
        assert!("127.0.0.1".parse::<ListenAddr>().is_err());
        assert!("127.0.0.1:99999".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!(":10809".parse::<ListenAddr>().is_err());
    }
}
