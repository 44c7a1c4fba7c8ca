//! The protobuf codec of the generated client and server: prost, with small per-stream buffers.
//!
//! tonic's default codec allocates an 8 KiB encode buffer and an 8 KiB decode buffer for every
//! stream up front. Our messages are a few hundred bytes and a controller holds one
//! long-lived stream per VM, so at 20,000 VMs those buffers alone would be over 300 MiB.
//! Buffers here start at 1 KiB and grow (in 1 KiB steps) only for a larger message.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial (and growth step of) each stream's encode and decode buffer.
pub const STREAM_BUFFER: usize = 1024;
/// Encoded bytes after which a stream yields to the runtime (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`STREAM_BUFFER`]-sized buffers.
#[derive(Debug, Clone, Copy)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(STREAM_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
