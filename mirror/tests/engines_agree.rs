//! Differential test: random operations through the io_uring engine and through the
//! pread/pwrite oracle must leave identical images and return identical reads.

use std::sync::Arc;

use mirror::engine::Via;
use mirror::{create_image, Engine, EngineKind, ImageFile};
use nbd_server::{BlockBackend, ZeroMode};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

// The daemon's allocator: its large buffers are page-aligned, so `write_through` takes the
// O_DIRECT path here as it does in the daemon (glibc's large blocks are not aligned).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: usize,
        byte: u8,
        fua: bool,
    },
    Read {
        offset: u64,
        len: usize,
    },
    /// A write nobody reads back soon (a secondary's): O_DIRECT when large and aligned.
    WriteThrough {
        offset: u64,
        len: usize,
        byte: u8,
    },
    /// A bulk read bypassing the page cache (O_DIRECT when aligned): must see every write,
    /// flushed or not.
    ReadUncached {
        offset: u64,
        len: usize,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        may_trim: bool,
    },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|o| (Just(o), 0..=(SIZE - o).min(200_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>(), any::<bool>())
            .prop_map(|((offset, len), byte, fua)| Op::Write { offset, len: len as usize, byte, fua }),
        3 => range.clone().prop_map(|(offset, len)| Op::Read { offset, len: len as usize }),
        // Mostly aligned ranges (the uncached path), some not (its fallback).
        2 => (0..SIZE / 4096, 1..=16usize, any::<bool>()).prop_map(|(block, blocks, skew)| {
            let offset = block * 4096 + u64::from(skew) * 512;
            let len = (blocks * 4096).min((SIZE - offset) as usize);
            Op::ReadUncached { offset, len }
        }),
        // Mostly at least 256 KiB and aligned (the O_DIRECT path), some smaller or skewed.
        2 => (0..SIZE / 4096, 1..=96usize, any::<bool>(), any::<u8>()).prop_map(|(block, blocks, skew, byte)| {
            let offset = block * 4096 + u64::from(skew) * 512;
            let len = (blocks * 4096).min((SIZE - offset) as usize);
            Op::WriteThrough { offset, len, byte }
        }),
        1 => range.clone().prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (range, any::<bool>()).prop_map(|((offset, len), may_trim)| Op::Zero { offset, len, may_trim }),
        1 => Just(Op::Flush),
    ]
}

/// The shape of tokio runtime the tests run the engines on: two workers, like this machine.
fn two_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open(dir: &tempfile::TempDir, name: &str, kind: EngineKind) -> ImageFile {
    let path = dir.path().join(name);
    create_image(&path, SIZE).unwrap();
    ImageFile::open(&path, false, kind).unwrap()
}

async fn apply(img: &ImageFile, op: &Op) -> Option<Vec<u8>> {
    match *op {
        Op::Write {
            offset,
            len,
            byte,
            fua,
        } => {
            img.write(offset, vec![byte; len], fua).await.unwrap();
            None
        }
        Op::WriteThrough { offset, len, byte } => {
            img.write_through(offset, vec![byte; len], false)
                .await
                .unwrap();
            // Whichever path it took, the page cache must not serve older data afterwards.
            let back = img.read(offset, len).await.unwrap();
            assert!(
                back.iter().all(|&b| b == byte),
                "a cached read after write_through at {offset}+{len} saw older data"
            );
            None
        }
        Op::Read { offset, len } => Some(img.read(offset, len).await.unwrap()),
        Op::ReadUncached { offset, len } => {
            let bulk = img
                .read_uncached(offset, len)
                .await
                .unwrap()
                .bytes()
                .to_vec();
            let cached = img.read(offset, len).await.unwrap();
            assert!(
                bulk == cached,
                "uncached read differs from the cached one at {offset}+{len}"
            );
            Some(bulk)
        }
        Op::Trim { offset, len } => {
            img.trim(offset, len, false).await.unwrap();
            None
        }
        Op::Zero {
            offset,
            len,
            may_trim,
        } => {
            let mode = ZeroMode {
                may_trim,
                fast_only: false,
                fua: false,
            };
            img.write_zeroes(offset, len, mode).await.unwrap();
            None
        }
        Op::Flush => {
            img.flush().await.unwrap();
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn uring_and_sync_engines_agree(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = two_worker_runtime();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let uring = open(&dir, "uring.img", EngineKind::Uring);
            let sync = open(&dir, "sync.img", EngineKind::Sync);
            assert_eq!(uring.engine_name(), "uring");
            for op in &ops {
                let a = apply(&uring, op).await;
                let b = apply(&sync, op).await;
                assert_eq!(a, b, "reads differ after {op:?}");
            }
            let whole_a = uring.read(0, SIZE as usize).await.unwrap();
            let whole_b = sync.read(0, SIZE as usize).await.unwrap();
            assert!(whole_a == whole_b, "images differ");
            let on_disk = std::fs::read(dir.path().join("uring.img")).unwrap();
            assert!(on_disk == whole_a, "io_uring image file differs from what it reads");
        });
    }
}

#[test]
fn many_concurrent_uring_operations_complete() {
    let rt = two_worker_runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let img = Arc::new(open(&dir, "c.img", EngineKind::Uring));
        // More operations than the completion queue holds, in flight at once.
        let mut tasks = Vec::new();
        for i in 0..3000u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                let off = (i * 4096) % SIZE;
                img.write(off, vec![(i % 251) as u8; 4096], i % 7 == 0)
                    .await
                    .unwrap();
                img.read(off, 4096).await.unwrap().len()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 4096);
        }
    });
}

#[test]
fn dropped_operations_do_not_corrupt_or_hang() {
    let rt = two_worker_runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let img = Arc::new(open(&dir, "d.img", EngineKind::Uring));
        for i in 0..200u64 {
            let img2 = img.clone();
            let t = tokio::spawn(async move {
                img2.read(
                    (i * 512) % SIZE,
                    65536.min((SIZE - (i * 512) % SIZE) as usize),
                )
                .await
            });
            if i % 2 == 0 {
                t.abort();
            }
        }
        img.write(0, vec![7; 4096], true).await.unwrap();
        assert_eq!(img.read(0, 4096).await.unwrap(), vec![7; 4096]);
    });
    // Dropping the runtime and the engine with operations possibly in flight must not crash.
}

/// Reads that miss the page cache complete asynchronously (the kernel finishes them from a
/// page-unlock callback, not inline): they must still wake their request, on the
/// single-threaded runtimes the daemon's shards use. A lost wake-up here hangs a client.
#[test]
fn cold_cache_reads_complete_on_a_shard_runtime() {
    use std::os::fd::AsRawFd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cold.img");
        let size = 16u64 << 20;
        create_image(&path, size).unwrap();
        let img = ImageFile::open(&path, false, EngineKind::Uring).unwrap();
        for chunk in 0..(size >> 20) {
            img.write(chunk << 20, vec![(chunk % 251) as u8 + 1; 1 << 20], false)
                .await
                .unwrap();
        }
        img.flush().await.unwrap();
        let file = std::fs::File::open(&path).unwrap();
        for round in 0..4u64 {
            nix::fcntl::posix_fadvise(
                file.as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
            for i in 0..500u64 {
                let off = ((i * 7919 + round * 104_729) % (size / 4096)) * 4096;
                let read =
                    tokio::time::timeout(std::time::Duration::from_secs(10), img.read(off, 4096))
                        .await
                        .expect("a cold read never completed (lost wake-up)")
                        .unwrap();
                assert_eq!(read, vec![((off >> 20) % 251) as u8 + 1; 4096]);
            }
        }
    });
}

/// The O_DIRECT write path itself, on both engines, with a dirty cached page inside the
/// range it overwrites: the kernel must write that page back and drop it first, so a cached
/// read afterwards sees the uncached write and nothing older.
#[test]
fn uncached_writes_replace_dirty_cached_pages() {
    use std::os::unix::fs::OpenOptionsExt;
    let rt = two_worker_runtime();
    rt.block_on(async {
        for kind in [EngineKind::Uring, EngineKind::Sync] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let path = dir.path().join("direct.img");
            create_image(&path, SIZE).unwrap();
            let open = |direct: bool| {
                let mut o = std::fs::OpenOptions::new();
                o.read(true).write(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                Arc::new(o.open(&path).unwrap())
            };
            let engine = Engine::new(kind, open(false), Some(open(true))).unwrap();
            let (_, r) = engine
                .write_at(Via::PageCache, vec![0x11; 4096], 0, 69_632, false)
                .await;
            r.unwrap();
            let len = 256 * 1024;
            let mut buf: Vec<u8> = Vec::with_capacity(len + 4096);
            let at = buf.as_ptr().align_offset(4096);
            buf.resize(at + len, 0x22);
            let (_, r) = engine.write_at(Via::Direct, buf, at, 65_536, false).await;
            assert_eq!(r.unwrap(), len, "{kind:?}");
            let (got, r) = engine
                .read_at(Via::PageCache, vec![0; len + 8192], 0, 61_440)
                .await;
            assert_eq!(r.unwrap(), len + 8192);
            assert!(got[..4096].iter().all(|&b| b == 0), "{kind:?}");
            assert!(got[4096..4096 + len].iter().all(|&b| b == 0x22), "{kind:?}");
            assert!(got[4096 + len..].iter().all(|&b| b == 0), "{kind:?}");
        }
    });
}
