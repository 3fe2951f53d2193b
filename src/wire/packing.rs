//! Which compression a link's data batches get: the route's choice, what
//! the peer speaks, and — for `auto` — the link's measured round trip and
//! how well its data compresses. Plain synchronous code, no I/O and no
//! clock: the link's writer feeds it RTT samples and batch sizes and asks
//! it, per batch, what to do.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CAP_LZ4, CAP_ZSTD};

/// A route's `compression` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    Off,
    Lz4,
    Zstd,
    /// From the link's round trip and whether it keeps up: off below
    /// [`AUTO_ZSTD_RTT`] (same datacenter); zstd level 1 beyond, and level 3
    /// from [`AUTO_ZSTD_HIGH_RTT`] while data waits for the link; lz4 only
    /// for a peer that speaks no zstd; off for data that does not compress.
    /// (BENCHMARKS.md, "Compression": on a 100 Mbit/s, 40 ms link, zstd 1
    /// carried 1.3–1.7x lz4's messages for ~1.3x its CPU.)
    #[default]
    Auto,
}

impl Compression {
    /// Each mode by the name the configuration gives it.
    pub const BY_NAME: [(&'static str, Compression); 4] = [
        ("off", Compression::Off),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
        ("auto", Compression::Auto),
    ];

    pub fn parse(s: &str) -> Option<Compression> {
        Compression::BY_NAME.iter().find(|(name, _)| *name == s).map(|&(_, c)| c)
    }
}

/// How a `Packed` frame's body is compressed (in the frame header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Packing {
    /// One lz4 block (`lz4-v1`).
    Lz4,
    /// One zstd frame (`zstd-v1`).
    Zstd,
}

impl Packing {
    pub const ALL: [Packing; 2] = [Packing::Lz4, Packing::Zstd];

    /// The metric label (`codec`).
    pub fn label(self) -> &'static str {
        match self {
            Packing::Lz4 => "lz4",
            Packing::Zstd => "zstd",
        }
    }
}

/// What to do with one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    /// With this level.
    Zstd(i32),
}

impl Codec {
    pub fn packing(self) -> Packing {
        match self {
            Codec::Lz4 => Packing::Lz4,
            Codec::Zstd(_) => Packing::Zstd,
        }
    }
}

/// Batches smaller than this go as they are (compressing a few hundred
/// bytes saves little and costs a pass).
pub const PACK_MIN: usize = 1024;
/// `auto`: below this round trip (same datacenter, or loopback), no
/// compression: the link is rarely the bottleneck and CPU is.
pub const AUTO_ZSTD_RTT: Duration = Duration::from_millis(10);
/// `auto`: from this round trip, zstd level 3 while data waits for the
/// link (a better ratio for 1.5–2x the CPU of level 1).
pub const AUTO_ZSTD_HIGH_RTT: Duration = Duration::from_millis(100);
/// The zstd level of `compression = "zstd"`.
pub const ZSTD_LEVEL: i32 = 1;
/// `auto` stops compressing data that saves less than this share of its
/// bytes (already compressed, encrypted, random)...
pub const POOR_SAVING: f64 = 0.10;
/// ...and then tries one batch in this many, to notice when it changes.
pub const PROBE_EVERY: u32 = 32;
/// Batches the saving is averaged over (an exponential moving average).
const SAVING_SPAN: f64 = 8.0;

/// One link's compression state.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Compression,
    /// Whether the peer speaks zstd (`auto` picks lz4 otherwise).
    zstd: bool,
    /// The lowest round trip measured on the link (the path's, without the
    /// queues a busy link builds: a loaded link should not flip codecs).
    min_rtt: Option<Duration>,
    /// Moving average of the share of bytes compression saved.
    saving: Option<f64>,
    /// Batches skipped since the last probe, while the saving is poor.
    skipped: u32,
}

impl Policy {
    /// For a link whose route asks `mode` to a peer with these
    /// capabilities: a codec the peer does not list is never sent (a fixed
    /// mode turns off; `auto` picks among what is left).
    pub fn new(mode: Compression, peer_capabilities: &[String]) -> Policy {
        let has = |c: &str| peer_capabilities.iter().any(|p| p == c);
        let (lz4, zstd) = (has(CAP_LZ4), has(CAP_ZSTD));
        let mode = match mode {
            Compression::Lz4 if !lz4 => Compression::Off,
            Compression::Zstd if !zstd => Compression::Off,
            Compression::Auto if !lz4 && !zstd => Compression::Off,
            m => m,
        };
        Policy { mode, zstd, min_rtt: None, saving: None, skipped: 0 }
    }

    pub fn mode(&self) -> Compression {
        self.mode
    }

    /// Whether the next batches may be compressed at all (what the writer
    /// asks before gathering a batch, so that a link that never compresses
    /// — `off`, or `auto` in the same datacenter — writes its frames
    /// straight out, never through a second buffer).
    pub fn may_pack(&self) -> bool {
        match self.mode {
            Compression::Off => false,
            Compression::Lz4 | Compression::Zstd => true,
            Compression::Auto => self.min_rtt.is_some_and(|rtt| rtt >= AUTO_ZSTD_RTT),
        }
    }

    /// A round trip measured on the link.
    pub fn rtt(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// What to do with a batch of `raw` bytes of data frames: `None` sends
    /// it as it is. `backed_up`: the last write waited for the connection,
    /// or more data was waiting than one batch holds (the link, not the
    /// sender, is the bottleneck: bytes saved are throughput gained).
    pub fn choose(&mut self, raw: usize, backed_up: bool) -> Option<Codec> {
        if raw < PACK_MIN || !self.may_pack() {
            return None;
        }
        match self.mode {
            Compression::Off => None,
            Compression::Lz4 => Some(Codec::Lz4),
            Compression::Zstd => Some(Codec::Zstd(ZSTD_LEVEL)),
            Compression::Auto => {
                // (`may_pack`: a round trip of at least AUTO_ZSTD_RTT.)
                let rtt = self.min_rtt?;
                let codec = if !self.zstd {
                    Codec::Lz4
                } else if rtt < AUTO_ZSTD_HIGH_RTT || !backed_up {
                    Codec::Zstd(1)
                } else {
                    Codec::Zstd(3)
                };
                if self.saving.is_some_and(|s| s < POOR_SAVING) {
                    self.skipped += 1;
                    if self.skipped < PROBE_EVERY {
                        return None;
                    }
                    self.skipped = 0;
                }
                Some(codec)
            }
        }
    }

    /// A batch of `raw` bytes went as `packed` bytes.
    pub fn packed(&mut self, raw: usize, packed: usize) {
        let saved = 1.0 - packed as f64 / raw.max(1) as f64;
        self.saving = Some(match self.saving {
            None => saved,
            Some(s) => s + (saved - s) / SAVING_SPAN,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    fn all() -> Vec<String> {
        caps(crate::wire::CAPABILITIES)
    }

    fn auto() -> Policy {
        Policy::new(Compression::Auto, &all())
    }

    #[test]
    fn a_codec_the_peer_does_not_speak_is_never_used() {
        let lz4 = caps(&["heartbeat-v1", "lz4-v1"]);
        let zstd = caps(&["zstd-v1"]);
        let none = caps(&["heartbeat-v1"]);
        assert_eq!(Policy::new(Compression::Zstd, &all()).mode(), Compression::Zstd);
        assert_eq!(Policy::new(Compression::Zstd, &lz4).mode(), Compression::Off);
        assert_eq!(Policy::new(Compression::Lz4, &none).mode(), Compression::Off);
        assert_eq!(Policy::new(Compression::Auto, &none).mode(), Compression::Off);
        assert_eq!(Policy::new(Compression::Auto, &lz4).mode(), Compression::Auto);
        // auto with an lz4-only peer never picks zstd, even on a long link,
        // and with a zstd-only peer never lz4.
        let mut p = Policy::new(Compression::Auto, &all());
        p.rtt(Duration::from_millis(150));
        assert_eq!(p.choose(64 * 1024, true), Some(Codec::Zstd(3)));
        let mut p = Policy::new(Compression::Auto, &lz4);
        p.rtt(Duration::from_millis(150));
        assert_eq!(p.choose(64 * 1024, true), Some(Codec::Lz4));
        let mut p = Policy::new(Compression::Auto, &zstd);
        p.rtt(Duration::from_millis(20));
        assert_eq!(p.choose(64 * 1024, false), Some(Codec::Zstd(1)));
    }

    #[test]
    fn fixed_modes_pack_every_batch_over_the_minimum() {
        let mut p = Policy::new(Compression::Lz4, &all());
        assert_eq!(p.choose(PACK_MIN - 1, false), None);
        assert_eq!(p.choose(PACK_MIN, false), Some(Codec::Lz4));
        // Even when it saves nothing, and whatever the load: the operator
        // asked for it.
        p.packed(10_000, 10_100);
        assert_eq!(p.choose(PACK_MIN, true), Some(Codec::Lz4));
        assert_eq!(Policy::new(Compression::Zstd, &all()).choose(PACK_MIN, false), Some(Codec::Zstd(ZSTD_LEVEL)));
        assert_eq!(Policy::new(Compression::Off, &all()).choose(1 << 20, true), None);
        assert!(!Policy::new(Compression::Off, &all()).may_pack());
        assert!(Policy::new(Compression::Zstd, &all()).may_pack());
    }

    #[test]
    fn auto_follows_the_lowest_round_trip_and_the_backlog() {
        let mut p = auto();
        // Nothing measured yet: as it is (and written straight out).
        assert_eq!(p.choose(64 * 1024, true), None);
        assert!(!p.may_pack());
        // Same datacenter: as it is, even backed up.
        p.rtt(Duration::from_millis(3));
        assert_eq!(p.choose(64 * 1024, true), None);
        assert!(!p.may_pack());
        // 40 ms: zstd 1, backed up or not.
        let mut p = auto();
        p.rtt(Duration::from_millis(40));
        assert!(p.may_pack());
        assert_eq!(p.choose(64 * 1024, false), Some(Codec::Zstd(1)));
        assert_eq!(p.choose(256 * 1024, true), Some(Codec::Zstd(1)));
        // A loaded link's longer round trips do not move it.
        p.rtt(Duration::from_millis(400));
        assert_eq!(p.choose(64 * 1024, true), Some(Codec::Zstd(1)));
        // From 100 ms: zstd 3 while data waits for the link.
        let mut p = auto();
        p.rtt(Duration::from_millis(100));
        assert_eq!(p.choose(64 * 1024, false), Some(Codec::Zstd(1)));
        assert_eq!(p.choose(64 * 1024, true), Some(Codec::Zstd(3)));
    }

    #[test]
    fn auto_stops_packing_what_does_not_compress_and_probes_now_and_then() {
        let mut p = auto();
        p.rtt(Duration::from_millis(40));
        assert_eq!(p.choose(10_000, false), Some(Codec::Zstd(1)));
        p.packed(10_000, 10_040);
        // Poor: skipped, but one batch in PROBE_EVERY is tried.
        let tried = (0..PROBE_EVERY * 3).filter(|_| p.choose(10_000, false).is_some()).count();
        assert_eq!(tried, 3);
        // The data changed: the probes see it and packing resumes.
        for _ in 0..4 {
            p.packed(10_000, 2_000);
        }
        assert_eq!(p.choose(10_000, false), Some(Codec::Zstd(1)));
        assert_eq!(p.choose(10_000, false), Some(Codec::Zstd(1)));
    }
}
