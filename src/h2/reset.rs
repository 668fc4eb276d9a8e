//! What an HTTP/2 failure of the backend means for a call: whether it certainly never
//! reached the backend's application (so it may go elsewhere), and which gRPC status it
//! ends with. The rest of gRPC's wire format is [`crate::grpc`]'s.

use crate::grpc::Code;

/// Whether a failed call certainly never reached the backend's application: the stream was
/// refused (REFUSED_STREAM) or lay beyond the last stream a GOAWAY let through.
pub(super) fn never_processed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// The gRPC status a backend failure amounts to, as gRPC clients map HTTP/2 resets:
/// REFUSED_STREAM means the backend never processed the call (UNAVAILABLE, safe to retry),
/// CANCEL means CANCELLED; a lost or closing connection is UNAVAILABLE; any other reset
/// INTERNAL.
pub(super) fn code_for(e: &h2::Error) -> Code {
    if e.is_io() || e.is_go_away() {
        return Code::Unavailable;
    }
    match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(_) => Code::Internal,
        None => Code::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_map_as_grpc_clients_map_them() {
        let reset = |r| h2::Error::from(r);
        assert_eq!(
            code_for(&reset(h2::Reason::REFUSED_STREAM)),
            Code::Unavailable
        );
        assert_eq!(code_for(&reset(h2::Reason::CANCEL)), Code::Cancelled);
        assert_eq!(
            code_for(&reset(h2::Reason::ENHANCE_YOUR_CALM)),
            Code::ResourceExhausted
        );
        assert_eq!(code_for(&reset(h2::Reason::PROTOCOL_ERROR)), Code::Internal);
    }

    #[test]
    fn only_a_refused_stream_is_certainly_unprocessed() {
        assert!(never_processed(&h2::Error::from(
            h2::Reason::REFUSED_STREAM
        )));
        assert!(!never_processed(&h2::Error::from(h2::Reason::CANCEL)));
        assert!(!never_processed(&h2::Error::from(
            h2::Reason::INTERNAL_ERROR
        )));
    }
}
