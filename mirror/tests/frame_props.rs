//! Property tests of the replication frame codec: every message survives encode → decode,
//! and no byte sequence makes the decoder panic or allocate without bound.

use mirror::metadata::Generations;
use mirror::repl::frame::{
    decode_body, decode_header, decode_split, encode, encode_resync_data, encode_write,
    encode_write_head, fuzz_stream, negotiate_version, payload_prefix, FrameError, Message, Role,
    VolumeState, HEADER_LEN,
};
use proptest::prelude::*;

fn roundtrip(seq: u64, m: &Message) -> Message {
    let mut out = Vec::new();
    encode(seq, m, &mut out);
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&out[..HEADER_LEN]);
    let h = decode_header(&hb).expect("own header decodes");
    assert_eq!(h.seq, seq);
    decode_body(&h, out[HEADER_LEN..].to_vec()).expect("own body decodes")
}

fn arb_gens() -> impl Strategy<Value = Generations> {
    (any::<u64>(), any::<u64>(), any::<[u64; 4]>()).prop_map(|(current, sync, history)| {
        Generations {
            current,
            sync,
            history,
        }
    })
}

fn arb_message() -> impl Strategy<Value = Message> {
    let text = "[a-z0-9.-]{0,40}";
    prop_oneof![
        (any::<u16>(), any::<u16>(), text, text, any::<[u8; 32]>()).prop_map(
            |(min_version, max_version, node, volume, nonce)| Message::Hello {
                min_version,
                max_version,
                node,
                volume,
                nonce,
            }
        ),
        (any::<u16>(), text, any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
            |(version, node, nonce, proof)| Message::HelloReply {
                version,
                node,
                nonce,
                proof
            }
        ),
        any::<[u8; 32]>().prop_map(|proof| Message::HelloProof { proof }),
        (
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            arb_gens(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(
                |(size, p, consistent, has_data, generations, granularity, dirty_map)| {
                    Message::State(VolumeState {
                        size,
                        role: if p { Role::Primary } else { Role::Secondary },
                        consistent,
                        has_data,
                        unconfirmed: granularity % 2 == 1,
                        lost_cache: granularity % 3 == 1,
                        generations,
                        granularity,
                        dirty_map,
                    })
                }
            ),
        (
            any::<u64>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(offset, fua, data)| Message::Write { offset, fua, data }),
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(offset, length, fua)| {
            Message::Trim {
                offset,
                length,
                fua,
            }
        }),
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(offset, length, may_trim, fua)| Message::Zeroes {
                offset,
                length,
                may_trim,
                fua
            }
        ),
        Just(Message::Flush),
        Just(Message::Ping),
        Just(Message::Pong),
        Just(Message::Discard),
        any::<u32>().prop_map(|errno| Message::Ack { errno }),
        any::<u64>().prop_map(|bytes| Message::ResyncStart { bytes }),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(offset, raw_crc, payload)| Message::ResyncData {
                offset,
                raw_len: payload.len() as u32,
                compressed: false,
                raw_crc,
                payload
            }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| Message::ResyncZero { offset, length }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(offset, length, hash)| {
            Message::ResyncHash {
                offset,
                length,
                hash,
            }
        }),
        any::<bool>().prop_map(|equal| Message::HashMatch { equal }),
        arb_gens().prop_map(|generations| Message::ResyncDone { generations }),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(offset, length, block)| {
            Message::HashRequest {
                offset,
                length,
                block,
            }
        }),
        proptest::collection::vec(any::<[u8; 32]>(), 0..5)
            .prop_map(|hashes| Message::HashReply { hashes }),
        text.prop_map(|message| Message::Error { message }),
    ]
}

proptest! {
    /// Two nodes use the newest version both speak; with none in common (or an empty range)
    /// they use none.
    #[test]
    fn the_version_chosen_is_the_newest_both_speak(offered in (0u16..12, 0u16..12), ours in (0u16..12, 0u16..12)) {
        let common = (0u16..12)
            .filter(|v| (offered.0..=offered.1).contains(v) && (ours.0..=ours.1).contains(v))
            .max();
        prop_assert_eq!(negotiate_version(offered, ours), common);
        prop_assert_eq!(negotiate_version(ours, offered), common);
    }

    #[test]
    fn every_message_roundtrips(seq in any::<u64>(), m in arb_message()) {
        prop_assert_eq!(roundtrip(seq, &m), m);
    }

    #[test]
    fn encode_write_matches_the_generic_encoder(seq in any::<u64>(), offset in any::<u64>(), fua in any::<bool>(),
                                                data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut a = Vec::new();
        encode(seq, &Message::Write { offset, fua, data: data.clone() }, &mut a);
        let mut b = Vec::new();
        encode_write(seq, offset, fua, &data, &mut b);
        prop_assert_eq!(&a, &b);
        // The split form the primary sends: head, then the data from the caller's buffer.
        let mut c = encode_write_head(seq, offset, fua, &data);
        c.extend_from_slice(&data);
        prop_assert_eq!(a, c);
    }

    #[test]
    fn encode_resync_data_matches_the_generic_encoder(seq in any::<u64>(), offset in any::<u64>(),
                                                      raw_len in any::<u32>(), compressed in any::<bool>(), raw_crc in any::<u32>(),
                                                      payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut a = Vec::new();
        encode(seq, &Message::ResyncData { offset, raw_len, compressed, raw_crc, payload: payload.clone() }, &mut a);
        let mut b = Vec::new();
        encode_resync_data(seq, offset, raw_len, compressed, raw_crc, &payload, &mut b);
        prop_assert_eq!(a, b);
    }

    /// Any corruption of a frame's body is caught by its checksum or the decoder: never a
    /// different message silently.
    #[test]
    fn corrupted_bodies_are_refused(m in arb_message(), pos in any::<prop::sample::Index>(), flip in 1u8..) {
        let mut out = Vec::new();
        encode(7, &m, &mut out);
        if out.len() > HEADER_LEN {
            let i = HEADER_LEN + pos.index(out.len() - HEADER_LEN);
            out[i] ^= flip;
            let mut hb = [0u8; HEADER_LEN];
            hb.copy_from_slice(&out[..HEADER_LEN]);
            let h = decode_header(&hb).unwrap();
            prop_assert_eq!(decode_body(&h, out[HEADER_LEN..].to_vec()), Err(FrameError::Checksum));
        }
    }

    /// A body read as its fixed fields and its payload decodes as the whole body does, and
    /// a corruption anywhere in it is caught the same way.
    #[test]
    fn split_bodies_decode_like_whole_ones(m in arb_message(), pos in any::<prop::sample::Index>(), flip in 1u8..) {
        let mut out = Vec::new();
        encode(9, &m, &mut out);
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&out[..HEADER_LEN]);
        let h = decode_header(&hb).unwrap();
        let body = out[HEADER_LEN..].to_vec();
        if let Some(p) = payload_prefix(h.kind) {
            prop_assert_eq!(decode_split(&h, &body[..p], body[p..].to_vec()), Ok(m));
            let mut bad = body.clone();
            let i = pos.index(bad.len());
            bad[i] ^= flip;
            prop_assert_eq!(decode_split(&h, &bad[..p], bad[p..].to_vec()), Err(FrameError::Checksum));
            // A prefix cut short is refused, never read past.
            if p > 0 {
                prop_assert!(decode_split(&h, &body[..p - 1], body[p - 1..].to_vec()).is_err());
            }
        }
        // The link's reader, on the frame's bytes, gives the same message.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut stream = &out[..];
        let read = rt.block_on(mirror::repl::link::read_frame(&mut stream)).unwrap();
        prop_assert_eq!(read.map(|(_, m)| m), decode_body(&h, body).ok());
    }

    #[test]
    fn arbitrary_streams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = fuzz_stream(&data);
    }

    #[test]
    fn arbitrary_headers_never_panic(h in any::<[u8; HEADER_LEN]>()) {
        let _ = decode_header(&h);
    }
}

#[test]
fn oversized_and_foreign_headers_are_refused() {
    let mut out = Vec::new();
    encode(1, &Message::Flush, &mut out);
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&out[..HEADER_LEN]);
    let mut big = hb;
    big[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode_header(&big), Err(FrameError::TooLong(_))));
    let mut foreign = hb;
    foreign[0] = b'G';
    assert!(matches!(
        decode_header(&foreign),
        Err(FrameError::BadMagic(_))
    ));
    let mut kind = hb;
    kind[4] = 200;
    assert!(matches!(
        decode_header(&kind),
        Err(FrameError::UnknownKind(200))
    ));
}
