//! `nbdmirror bitmap inspect`: a volume's metadata file, read without the daemon.

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use mirror::metadata::{Flags, Snapshot};
use serde::Serialize;

#[derive(Args)]
pub struct BitmapArgs {
    #[command(subcommand)]
    command: BitmapCommand,
}

#[derive(Subcommand)]
enum BitmapCommand {
    Inspect(InspectArgs),
}

/// Show a volume's metadata file: header, generations, dirty map and activity map.
///
/// Reads the file with plain reads (no lock, no mapping, no writes), so it is safe while the
/// daemon runs (it then shows a moment's state). A corrupt or truncated file is an error
/// (exit code 1).
///
/// The map strip has one character per column of the volume: `.` clean, then `░ ▒ ▓ █` for
/// up to 25%, 50%, 75% and more of the column dirty; `^` below marks columns holding a hot
/// activity extent (writes may be in flight there). The PNG shows the same as a grid of cells
/// in reading order (left to right, top to bottom, from offset 0): light grey clean, yellow
/// to dark red by dirty fraction, a blue frame around cells holding a hot extent, white past
/// the end of the volume; a legend row at the bottom shows the colour scale from 0% to 100%.
///
/// JSON keys (stable): `path`, `format_version`, `header_slot`, `header_sequence`,
/// `standby_header_error` (string or null), `node_name`, `peer_name` (the last peer that
/// connected; empty before any did), `volume_size`,
/// `dirty_granularity`, `activity_extent_size`, `activity_capacity`,
/// `flags` {`consistent`, `clean_shutdown`, `primary`, `unconfirmed`, `lost_cache`},
/// `generations` {`current`, `sync`, `history`} (each "0x" and 16 hex digits, since JSON
/// numbers lose precision past 2^53), `counters` {`created_unix`, `opens`, `unclean_opens`},
/// `dirty_bits`, `total_bits`, `dirty_bytes`, `dirty_percent`, `dirty_ranges_total`,
/// `dirty_ranges` (the first --max-ranges, each {`offset`, `length`} in bytes),
/// `hot_extents` (extent indexes), `hot_extent_count`, `strip` {`columns`, `column_bytes`,
/// `map`, `hot`}, `png` (the path written, or null).
#[derive(Args)]
struct InspectArgs {
    /// The volume's metadata file (e.g. DATA_DIR/VOLUME.meta).
    metafile: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also draw the dirty map into this PNG file.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// How many dirty ranges to list (the rest are counted).
    #[arg(long, default_value_t = 20, value_name = "N")]
    max_ranges: usize,
    /// Width of the terminal strip in columns.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    columns: u16,
}

pub fn run(args: BitmapArgs) -> anyhow::Result<()> {
    match args.command {
        BitmapCommand::Inspect(a) => inspect(a),
    }
}

#[derive(Serialize)]
struct Report {
    path: String,
    format_version: u32,
    header_slot: usize,
    header_sequence: u64,
    standby_header_error: Option<String>,
    node_name: String,
    peer_name: String,
    volume_size: u64,
    dirty_granularity: u64,
    activity_extent_size: u64,
    activity_capacity: u64,
    flags: FlagsJson,
    generations: GenerationsJson,
    counters: CountersJson,
    dirty_bits: u64,
    total_bits: u64,
    dirty_bytes: u64,
    dirty_percent: f64,
    dirty_ranges_total: u64,
    dirty_ranges: Vec<RangeJson>,
    hot_extents: Vec<u64>,
    hot_extent_count: u64,
    strip: StripJson,
    png: Option<String>,
}

#[derive(Serialize)]
struct FlagsJson {
    consistent: bool,
    clean_shutdown: bool,
    primary: bool,
    unconfirmed: bool,
    lost_cache: bool,
}

#[derive(Serialize)]
struct GenerationsJson {
    current: String,
    sync: String,
    history: Vec<String>,
}

#[derive(Serialize)]
struct CountersJson {
    created_unix: u64,
    opens: u64,
    unclean_opens: u64,
}

#[derive(Serialize)]
struct RangeJson {
    offset: u64,
    length: u64,
}

#[derive(Serialize)]
struct StripJson {
    columns: usize,
    column_bytes: u64,
    map: String,
    hot: String,
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let snap = Snapshot::read(&args.metafile)?;
    if let Some(png) = &args.png {
        write_png(&snap, png).with_context(|| format!("writing {}", png.display()))?;
    }
    let report = report(&args, &snap);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report, &snap));
    }
    Ok(())
}

fn report(args: &InspectArgs, snap: &Snapshot) -> Report {
    let h = &snap.header;
    let strip = strip(snap, usize::from(args.columns));
    let ranges: Vec<(u64, u64)> = snap.dirty_ranges().collect();
    let dirty_bits = snap.dirty.bits().count();
    let total_bits = snap.layout.dirty_bits;
    let dirty_bytes: u64 = ranges.iter().map(|r| r.1).sum();
    let dirty_percent = 100.0 * dirty_bytes as f64 / h.volume_size as f64;
    let hot: Vec<u64> = snap.activity.bits().runs().flatten().collect();
    let gen = |g: u64| format!("{g:#018x}");
    Report {
        path: args.metafile.display().to_string(),
        format_version: mirror::metadata::header::FORMAT_VERSION,
        header_slot: snap.active_slot,
        header_sequence: h.sequence,
        standby_header_error: snap.standby_error.as_ref().map(ToString::to_string),
        node_name: h.node_name.clone(),
        peer_name: h.peer_name.clone(),
        volume_size: h.volume_size,
        dirty_granularity: u64::from(h.dirty_granularity),
        activity_extent_size: u64::from(h.activity_extent_size),
        activity_capacity: u64::from(h.activity_capacity),
        flags: FlagsJson {
            consistent: h.flags.contains(Flags::CONSISTENT),
            clean_shutdown: h.flags.contains(Flags::CLEAN_SHUTDOWN),
            primary: h.flags.contains(Flags::PRIMARY),
            unconfirmed: h.flags.contains(Flags::UNCONFIRMED),
            lost_cache: h.flags.contains(Flags::LOST_CACHE),
        },
        generations: GenerationsJson {
            current: gen(h.generations.current),
            sync: gen(h.generations.sync),
            history: h.generations.history.iter().map(|&g| gen(g)).collect(),
        },
        counters: CountersJson {
            created_unix: h.counters.created_unix,
            opens: h.counters.opens,
            unclean_opens: h.counters.unclean_opens,
        },
        dirty_bits,
        total_bits,
        dirty_bytes,
        dirty_percent,
        dirty_ranges_total: ranges.len() as u64,
        dirty_ranges: ranges
            .iter()
            .take(args.max_ranges)
            .map(|&(offset, length)| RangeJson { offset, length })
            .collect(),
        hot_extent_count: hot.len() as u64,
        hot_extents: hot,
        strip,
        png: args.png.as_ref().map(|p| p.display().to_string()),
    }
}

fn text(r: &Report, snap: &Snapshot) -> String {
    let mut o = String::new();
    let standby = match &r.standby_header_error {
        None => "valid".to_string(),
        Some(e) => format!("unusable ({e})"),
    };
    let _ = writeln!(o, "metadata file   {}", r.path);
    let _ = writeln!(
        o,
        "format          version {}, header copy {} (sequence {}); other copy {}",
        r.format_version, r.header_slot, r.header_sequence, standby
    );
    // Empty until a peer first connected.
    let peer = if r.peer_name.is_empty() {
        String::new()
    } else {
        format!(" (peer: {})", r.peer_name)
    };
    let _ = writeln!(o, "node            {}{peer}", r.node_name);
    let _ = writeln!(
        o,
        "volume size     {} ({} bytes)",
        human(r.volume_size),
        r.volume_size
    );
    let _ = writeln!(
        o,
        "granularity     {} per dirty bit ({} bits)",
        human(r.dirty_granularity),
        r.total_bits
    );
    let _ = writeln!(
        o,
        "activity        {} extents ({}), hot-set capacity {}",
        human(r.activity_extent_size),
        snap.layout.activity_bits,
        r.activity_capacity
    );
    let mut flags = vec![if r.flags.consistent {
        "consistent"
    } else {
        "INCONSISTENT (resync not finished)"
    }];
    flags.push(if r.flags.clean_shutdown {
        "clean shutdown"
    } else {
        "open or crashed (no clean shutdown)"
    });
    if r.flags.primary {
        flags.push("primary");
    }
    if r.flags.unconfirmed {
        flags.push("unconfirmed (writes made alone, none acknowledged)");
    }
    if r.flags.lost_cache {
        flags.push(
            "lost cache (crashed with its machine: the peer's copy of the hot extents is taken)",
        );
    }
    let _ = writeln!(o, "flags           {}", flags.join(", "));
    let _ = writeln!(
        o,
        "generations     current {}, in sync with peer at {}",
        r.generations.current, r.generations.sync
    );
    let _ = writeln!(
        o,
        "                history {}",
        r.generations.history.join(" ")
    );
    let _ = writeln!(
        o,
        "counters        created {} (unix), opens {}, unclean opens {}",
        r.counters.created_unix, r.counters.opens, r.counters.unclean_opens
    );
    let _ = writeln!(
        o,
        "dirty           {} of {} bits, {:.2}%, {} ({} bytes)",
        r.dirty_bits,
        r.total_bits,
        r.dirty_percent,
        human(r.dirty_bytes),
        r.dirty_bytes
    );
    let hot: Vec<String> = r.hot_extents.iter().take(32).map(u64::to_string).collect();
    let more = r.hot_extents.len().saturating_sub(32);
    let _ = writeln!(
        o,
        "hot extents     {}{}{}",
        r.hot_extent_count,
        if hot.is_empty() {
            String::new()
        } else {
            format!(": {}", hot.join(" "))
        },
        if more > 0 {
            format!(" ... and {more} more")
        } else {
            String::new()
        }
    );
    let _ = writeln!(o, "dirty ranges    {}", r.dirty_ranges_total);
    for d in &r.dirty_ranges {
        let _ = writeln!(
            o,
            "  {:>14} +{:<12} {:>10}",
            d.offset,
            d.length,
            human(d.length)
        );
    }
    let rest = r.dirty_ranges_total - r.dirty_ranges.len() as u64;
    if rest > 0 {
        let _ = writeln!(o, "  ... and {rest} more");
    }
    let _ = writeln!(
        o,
        "map             |{}|  one column = {}",
        r.strip.map,
        human(r.strip.column_bytes)
    );
    if r.strip.hot.contains('^') {
        let _ = writeln!(o, "hot             |{}|", r.strip.hot);
    }
    let _ = writeln!(
        o,
        "                . clean  ░ <25%  ▒ <50%  ▓ <75%  █ dirty  ^ hot extent"
    );
    o
}

/// Bytes as a short human size (binary units).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Dirty fraction of each of `cells` equal slices of the volume (the last may be shorter),
/// and whether each holds a hot extent. Returns (fractions, hot, bytes per cell).
fn cells(snap: &Snapshot, cells: usize) -> (Vec<f64>, Vec<bool>, u64) {
    let size = snap.header.volume_size;
    let per = size.div_ceil(cells as u64).max(1);
    let n = size.div_ceil(per) as usize;
    let mut dirty = vec![0u64; n];
    for (off, len) in snap.dirty_ranges() {
        let (mut a, end) = (off, off + len);
        while a < end {
            let c = (a / per) as usize;
            let cell_end = ((c as u64 + 1) * per).min(end);
            dirty[c] += cell_end - a;
            a = cell_end;
        }
    }
    let extent = u64::from(snap.header.activity_extent_size);
    let mut hot = vec![false; n];
    for e in snap.activity.bits().runs().flatten() {
        let a = e * extent;
        let b = ((e + 1) * extent).min(size);
        for h in hot
            .iter_mut()
            .take(((b - 1) / per) as usize + 1)
            .skip((a / per) as usize)
        {
            *h = true;
        }
    }
    let frac = dirty
        .iter()
        .enumerate()
        .map(|(c, &d)| {
            let len = (((c as u64) + 1) * per).min(size) - c as u64 * per;
            d as f64 / len as f64
        })
        .collect();
    (frac, hot, per)
}

fn strip(snap: &Snapshot, columns: usize) -> StripJson {
    let (frac, hot, per) = cells(snap, columns);
    let map = frac
        .iter()
        .map(|&f| match f {
            f if f <= 0.0 => '.',
            f if f < 0.25 => '░',
            f if f < 0.5 => '▒',
            f if f < 0.75 => '▓',
            _ => '█',
        })
        .collect();
    let hot = hot.iter().map(|&h| if h { '^' } else { ' ' }).collect();
    StripJson {
        columns: frac.len(),
        column_bytes: per,
        map,
        hot,
    }
}

const GRID_COLS: usize = 64;
const CELL: usize = 10;
const GAP: usize = 2;
const PITCH: usize = CELL + GAP;

fn colour(f: f64) -> [u8; 3] {
    if f <= 0.0 {
        return [0xe4, 0xe4, 0xe4];
    }
    // Yellow (a little dirty) to dark red (all dirty).
    let t = f.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    [lerp(255.0, 150.0), lerp(210.0, 0.0), lerp(60.0, 0.0)]
}

fn write_png(snap: &Snapshot, path: &Path) -> anyhow::Result<()> {
    // One cell per granule for small volumes, at most 64 x 64 cells.
    let wanted = snap.layout.dirty_bits.min((GRID_COLS * GRID_COLS) as u64) as usize;
    let (frac, hot, _) = cells(snap, wanted);
    let cols = GRID_COLS.min(frac.len());
    let rows = frac.len().div_ceil(cols);
    let legend_rows = 2;
    let width = cols * PITCH + GAP;
    let height = (rows + legend_rows) * PITCH + GAP;
    let mut img = vec![255u8; width * height * 3];
    let mut fill = |x0: usize, y0: usize, w: usize, h: usize, c: [u8; 3]| {
        for y in y0..(y0 + h).min(height) {
            for x in x0..(x0 + w).min(width) {
                let i = (y * width + x) * 3;
                img[i..i + 3].copy_from_slice(&c);
            }
        }
    };
    const HOT: [u8; 3] = [0x1f, 0x5f, 0xd0];
    for (i, (&f, &h)) in frac.iter().zip(&hot).enumerate() {
        let (x, y) = (GAP + (i % cols) * PITCH, GAP + (i / cols) * PITCH);
        if h {
            fill(x - GAP, y - GAP, CELL + 2 * GAP, CELL + 2 * GAP, HOT);
        }
        fill(x, y, CELL, CELL, colour(f));
    }
    // Legend: 0% .. 100% in eleven swatches, then a hot-extent swatch, on the last row.
    let y = GAP + (rows + 1) * PITCH;
    for k in 0..=10 {
        fill(GAP + k * PITCH, y, CELL, CELL, colour(k as f64 / 10.0));
    }
    let hx = GAP + 13 * PITCH;
    if hx + PITCH < width {
        fill(hx - GAP, y - GAP, CELL + 2 * GAP, CELL + 2 * GAP, HOT);
        fill(hx, y, CELL, CELL, colour(0.0));
    }
    let file = File::create(path)?;
    let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(&img)?;
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror::metadata::{MetadataFile, MetadataOptions};

    fn args(metafile: PathBuf) -> InspectArgs {
        InspectArgs {
            metafile,
            json: false,
            png: None,
            max_ranges: 20,
            columns: 64,
        }
    }

    #[test]
    fn a_file_the_daemon_made_shows_no_unknown_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk0.meta");
        drop(MetadataFile::create(&path, 1 << 20, "node-a", MetadataOptions::default()).unwrap());
        let snap = Snapshot::read(&path).unwrap();
        let r = report(&args(path), &snap);
        let t = text(&r, &snap);
        assert!(t.contains("node            node-a\n"), "{t}");
        assert!(!t.contains("peer:"), "{t}");
    }

    #[test]
    fn read_errors_name_their_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [("missing.meta", None), ("short.meta", Some("hello\n"))] {
            let path = dir.path().join(name);
            if let Some(c) = content {
                std::fs::write(&path, c).unwrap();
            }
            let Err(e) = Snapshot::read(&path) else {
                panic!("{name} should not read")
            };
            let e = anyhow::Error::from(e);
            let line = crate::error_text(&e);
            let cause = e.chain().last().unwrap().to_string();
            assert_eq!(line.matches(&cause).count(), 1, "{line}");
            assert!(line.contains(name), "{line}");
        }
    }
}
