//! MQTT over WebSocket (`ws` and `wss` listeners): the HTTP upgrade and a byte-stream view
//! of the frames.
//!
//! The upgrade must ask for the listener's path (else 404) and offer the `mqtt` subprotocol
//! (MQTT-6.0.0-3; `mqttv3.1`, which older 3.1 clients send, is accepted too); a request
//! that offers neither is refused with 400 instead of being served as something it did not
//! ask for. The answer names the subprotocol chosen (MQTT-6.0.0-4).
//!
//! MQTT rides in binary frames with no alignment between packets and frames: the reader
//! hands on the payload of each binary frame as bytes (a packet may span frames, a frame may
//! hold several packets); ping and pong frames are answered by the WebSocket layer and
//! skipped; a text frame closes the connection (MQTT-6.0.0-1); a close frame ends the
//! stream. Each write of the broker goes out as one binary frame.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::{ByteReader, ByteWriter, WebSocketStream};
use futures_lite::{AsyncRead, AsyncWrite, Stream};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::StreamExt;

/// The subprotocols accepted, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// Bytes the WebSocket layer reads from the socket at a time.
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;

/// The size limit of an incoming frame and message for a broker whose packets are at most
/// `packet_bytes_max`: one message may carry a packet and the start of the next. (What the
/// broker writes is bounded by the connection's outbound buffer, written one batch, one
/// frame, at a time.)
pub fn message_bytes_max(packet_bytes_max: usize) -> usize {
    packet_bytes_max.saturating_mul(2)
}

/// Runs the WebSocket upgrade on `stream`.
pub async fn accept<S>(
    stream: S,
    path: &str,
    message_bytes_max: usize,
) -> Result<WebSocketStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(message_bytes_max))
        .max_frame_size(Some(message_bytes_max));
    let path = path.to_string();
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            return Err(refusal(StatusCode::NOT_FOUND, "no MQTT endpoint here"));
        }
        let offered: Vec<String> = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_ascii_lowercase())
            .collect();
        let Some(chosen) = SUBPROTOCOLS
            .iter()
            .find(|p| offered.iter().any(|o| o == *p))
        else {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "the mqtt WebSocket subprotocol is required",
            ));
        };
        resp.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        Ok(resp)
    };
    async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
}

#[allow(clippy::result_large_err)]
fn refusal(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

/// The reading half: the payload bytes of the binary frames.
pub type WsReader<S> = ByteReader<BinaryFrames<SplitStream<WebSocketStream<S>>>>;
/// The writing half: each write one binary frame.
pub type WsWriter<S> = ByteWriter<SplitSink<WebSocketStream<S>, Message>>;

/// Splits an upgraded connection into a byte reader and a byte writer.
pub fn split<S>(ws: WebSocketStream<S>) -> (WsReader<S>, WsWriter<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, stream) = ws.split();
    (ByteReader::new(BinaryFrames(stream)), ByteWriter::new(sink))
}

/// The binary messages of a WebSocket: control frames and empty frames skipped, a text frame
/// an error, a close frame the end.
#[derive(Debug)]
pub struct BinaryFrames<S>(S);

impl<S> Stream for BinaryFrames<S>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return match Pin::new(&mut self.0).poll_next(cx) {
                // A zero-length frame (RFC 6455 allows it; MQTT.js sends one for an empty
                // topic or payload) carries nothing: a byte reader would take its empty
                // read for the end of the stream.
                Poll::Ready(Some(Ok(Message::Binary(b)))) if b.is_empty() => continue,
                Poll::Ready(Some(Ok(m @ Message::Binary(_)))) => Poll::Ready(Some(Ok(m))),
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    Poll::Ready(Some(Err(WsError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    )))))
                }
                Poll::Ready(Some(Ok(Message::Close(_)))) => Poll::Ready(None),
                Poll::Ready(Some(Ok(_))) => continue,
                other => other,
            };
        }
    }
}
