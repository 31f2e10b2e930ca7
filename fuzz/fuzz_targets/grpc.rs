//! Seed 003's gRPC requests as the admin address receives them: the prost decoders of every
//! request message, and the translation of a decoded request into a pool spec, a pool name and
//! a backend address.
//!
//! Input: a first byte choosing the message type, then the message bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shoal_node::admin::grpc::{ip_backend, pb, pool_name, pool_spec};
use shoal_proto::spec::validate_pool_name;
use shoal_proto::{Command, State, apply};

/// A decoded message encodes to bytes that decode to the same message.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert_eq!(&again, m);
}

fn add_pool(req: &pb::AddPoolReq) {
    round_trip(req);
    let name = pool_name(&req.pattern);
    if !req.pattern.is_empty() {
        validate_pool_name(&name).expect("derived pool names are valid");
    }
    match pool_spec(req) {
        Ok(spec) => {
            assert!(!req.pattern.is_empty());
            let mut st = State::default();
            apply(&mut st, &Command::PutPool { name, spec }).expect("an accepted AddPool applies to an empty state");
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}"),
    }
}

fn backend(b: Option<&pb::Backend>) {
    if let Ok((addr, url_path)) = ip_backend(b) {
        assert_ne!(addr.port(), 0);
        assert!(!url_path.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 5 {
        0 => {
            if let Ok(req) = pb::AddPoolReq::decode(body) {
                add_pool(&req);
            }
        }
        1 => {
            if let Ok(req) = pb::AddBackendReq::decode(body) {
                round_trip(&req);
                backend(req.backend.as_ref());
            }
        }
        2 => {
            if let Ok(req) = pb::RemoveBackendReq::decode(body) {
                round_trip(&req);
                backend(req.backend.as_ref());
            }
        }
        3 => {
            if let Ok(req) = pb::PoolHealthReq::decode(body) {
                round_trip(&req);
            }
        }
        _ => {
            if let Ok(req) = pb::RemovePoolReq::decode(body) {
                round_trip(&req);
                let _ = pool_name(&req.pattern);
            }
        }
    }
});
