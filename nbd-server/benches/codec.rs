//! Encode/decode cost of the transmission codec: what every request pays on top of I/O.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nbd_server::handshake::Session;
use nbd_server::proto::*;
use nbd_server::reply::{self, Extent, ReplyMode, ReplyTo};
use nbd_server::request::{self, RequestHeader};

fn session(extended: bool) -> Session {
    Session {
        export: 0,
        structured_replies: true,
        extended_headers: extended,
        base_allocation: true,
        transmission_flags: nbd_server::transmission_flags(false),
    }
}

fn bench(c: &mut Criterion) {
    for extended in [false, true] {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 42,
            offset: 1 << 20,
            length: 4096,
        };
        let mut bytes = Vec::new();
        request::encode_header(&h, extended, &mut bytes);
        let s = session(extended);
        let label = if extended { "extended" } else { "compact" };
        c.bench_function(&format!("decode+validate {label} write"), |b| {
            b.iter(|| {
                let h = request::decode_header(black_box(&bytes), extended).unwrap();
                request::validate(&h, &s, 1 << 30).unwrap()
            })
        });
        let mode = ReplyMode::for_session(true, extended);
        let to = ReplyTo {
            cookie: 42,
            offset: 0,
        };
        let mut out = Vec::with_capacity(256);
        c.bench_function(&format!("encode {label} read header"), |b| {
            b.iter(|| {
                out.clear();
                reply::read_data_header(&mut out, mode, black_box(to), 4096);
            })
        });
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 8192,
                flags: 3,
            },
        ];
        c.bench_function(&format!("encode {label} block status"), |b| {
            b.iter(|| {
                out.clear();
                reply::block_status(&mut out, mode, black_box(to), 1, &extents);
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
