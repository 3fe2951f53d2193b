//! A peer gateway the test drives frame by frame: a real mutual-TLS
//! connection with a cluster's real certificate, the preamble and hello
//! done by the library, then whatever frames the test writes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use wandist::config::{PathAt, TlsFiles};
use wandist::link::handshake::{self, Established, HandshakeError, Identity, Offer};
use wandist::link::Timeouts;
use wandist::route::Window;
use wandist::wire::{codec, Frame};

use super::Certs;

pub const T: Timeouts = Timeouts { connect: Duration::from_secs(5), handshake: Duration::from_secs(5) };

pub fn tls(certs: &Certs, cluster: &str) -> wandist::tls::Tls {
    let at = |f: String| PathAt { path: certs.path(&f), line: None };
    let files = TlsFiles::new(at(format!("{cluster}.pem")), at(format!("{cluster}.key")), at("ca.pem".into()));
    wandist::tls::Tls::load(&files, Some(cluster), std::path::Path::new("test")).unwrap()
}

/// Connects to `to` (a gateway of `peer`) as cluster `me`, run `epoch`.
pub async fn connect(
    certs: &Certs,
    to: SocketAddr,
    me: &str,
    peer: &str,
    epoch: wandist::wire::Epoch,
) -> Result<Established, HandshakeError> {
    let id = Identity { cluster: me.into(), gateway: "raw".into(), epoch };
    let offer = Offer { links_wanted: 1, recv_window: Window { messages: 1000, bytes: 1 << 20 } };
    let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
    handshake::client(tcp, Some(&tls(certs, me)), peer, id.hello(offer), &T, 1 << 20).await
}

/// Writes frames on an established connection.
pub async fn send(est: &mut Established, frames: &[Frame]) -> std::io::Result<()> {
    let mut out = bytes::BytesMut::new();
    for f in frames {
        codec::encode(&f.header, &f.body, 64 << 20, &mut out).unwrap();
    }
    est.io.write_all(&out).await?;
    est.io.flush().await
}

/// Reads until the connection ends (or `within` passes); true if it ended.
pub async fn closed_within(est: &mut Established, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match est.io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
