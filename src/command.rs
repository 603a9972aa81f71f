//! The one `Command` type that HTTP routes and WebSocket frames both decode into.
//!
//! The front end (HTTP or WebSocket) hands this module the raw bytes of a request body
//! or a text frame; it gets back a [`Command`] whose strings and payload are slices
//! (`bytes::Bytes`) of those very bytes wherever the JSON needed no unescaping. Shard
//! code sees only `Command`s, never HTTP or frames. Decoding errors are typed
//! ([`CommandError`]) and carry the contract's status and code, mapped at the edge.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::protocol::frame::Utf8Bytes;

use crate::message::{span_in, MessageText};

pub mod scan;

/// Longest exchange or queue name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Name prefixes only the server may use.
pub const RESERVED_PREFIXES: [&str; 2] = ["amq.", "pubsub."];
/// Default prefetch of a subscription.
pub const DEFAULT_PREFETCH: u32 = 100;

/// Why a request or frame could not become a command.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// Malformed JSON, a missing or mistyped field, an unknown value.
    #[error("{0}")]
    BadRequest(String),
    /// The payload is over the configured limit.
    #[error("payload is {size} bytes, over the limit of {limit}")]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A name that starts with a reserved prefix.
    #[error("the name {0:?} is reserved for the server (amq. and pubsub. prefixes)")]
    Reserved(String),
    /// No route for this method and path.
    #[error("no such resource")]
    NoRoute,
    /// The path exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl CommandError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            CommandError::BadRequest(_) => 400,
            CommandError::PayloadTooLarge { .. } => 413,
            CommandError::Reserved(_) => 403,
            CommandError::NoRoute => 404,
            CommandError::MethodNotAllowed => 405,
        }
    }
    /// Contract error code.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::BadRequest(_) => "bad_request",
            CommandError::PayloadTooLarge { .. } => "payload_too_large",
            CommandError::Reserved(_) => "access_refused",
            CommandError::NoRoute => "not_found",
            CommandError::MethodNotAllowed => "method_not_allowed",
        }
    }
}

fn bad(msg: impl Into<String>) -> CommandError {
    CommandError::BadRequest(msg.into())
}

/// Exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every bound queue.
    Fanout,
    /// AMQP 0-9-1 topic patterns.
    Topic,
}

impl ExchangeKind {
    /// The contract's name for the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
        }
    }
    /// Parses a type name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(ExchangeKind::Direct),
            "fanout" => Some(ExchangeKind::Fanout),
            "topic" => Some(ExchangeKind::Topic),
            _ => None,
        }
    }
}

/// What a queue does when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready message.
    #[default]
    DropHead,
    /// Refuse the new message.
    RejectPublish,
}

impl Overflow {
    /// The contract's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop_head",
            Overflow::RejectPublish => "reject_publish",
        }
    }
    /// Parses a policy name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drop_head" => Some(Overflow::DropHead),
            "reject_publish" => Some(Overflow::RejectPublish),
            _ => None,
        }
    }
}

/// `POST /exchanges`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDecl {
    /// Exchange name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
}

/// Settings of a queue; two declarations are identical when these are equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueSpec {
    /// Survives restarts, with its messages.
    pub durable: bool,
    /// Most ready messages held.
    pub max_length: Option<u64>,
    /// Time a message may wait in the queue.
    pub message_ttl_ms: Option<u64>,
    /// What to do when `max_length` is reached.
    pub overflow: Overflow,
    /// Where dropped, expired and rejected messages go.
    pub dead_letter_exchange: Option<String>,
}

/// `POST /queues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDecl {
    /// Queue name.
    pub name: String,
    /// Its settings.
    pub spec: QueueSpec,
}

/// `POST /bindings` and `DELETE /bindings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingDecl {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key (a pattern for topic exchanges).
    pub key: String,
}

/// A publish, from `POST /publish` or a `PUBLISH` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Exchange, routing key and payload: ranges of the frame or body they came in.
    pub text: MessageText,
    /// Answer only once durable queues have it on disk.
    pub confirm: bool,
    /// Keep on disk when routed to a durable queue.
    pub persistent: bool,
    /// Per-message time to live.
    pub ttl_ms: Option<u64>,
    /// Raw JSON object of string headers.
    pub headers: Option<Bytes>,
    /// The client's `ref`, as a JSON token (WebSocket only).
    pub reference: Option<Bytes>,
}

/// Settlement mode of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Settled once written to the socket.
    Auto,
    /// Settled by `ACK` / `NACK`.
    Manual,
}

/// What a `SUBSCRIBE` attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeTarget {
    /// An existing queue.
    Queue(String),
    /// A new exclusive queue bound to this exchange with this key.
    Exchange {
        /// Exchange name.
        exchange: String,
        /// Binding key.
        key: String,
    },
}

/// `SUBSCRIBE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Queue or exchange.
    pub target: SubscribeTarget,
    /// Settlement mode.
    pub ack: AckMode,
    /// Most unacked messages outstanding (manual mode); 0 means no limit.
    pub prefetch: u32,
}

/// `UNSUBSCRIBE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsubscribe {
    /// By subscription id.
    Subscription(String),
    /// Every subscription of this connection on the queue.
    Queue(String),
}

/// Everything a client can ask of the broker.
#[derive(Debug, Clone)]
pub enum Command {
    /// `POST /exchanges`.
    DeclareExchange(ExchangeDecl),
    /// `GET /exchanges`.
    ListExchanges,
    /// `GET /exchanges/{name}`.
    GetExchange(String),
    /// `DELETE /exchanges/{name}`.
    DeleteExchange(String),
    /// `POST /queues`.
    DeclareQueue(QueueDecl),
    /// `GET /queues`.
    ListQueues,
    /// `GET /queues/{name}`.
    GetQueue(String),
    /// `DELETE /queues/{name}`.
    DeleteQueue(String),
    /// `POST /queues/{name}/purge`.
    PurgeQueue(String),
    /// `POST /bindings`.
    Bind(BindingDecl),
    /// `GET /bindings`.
    ListBindings,
    /// `DELETE /bindings`.
    Unbind(BindingDecl),
    /// `POST /publish` or `PUBLISH`.
    Publish(Publish),
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /`.
    Console,
    /// `SUBSCRIBE`.
    Subscribe(Subscribe),
    /// `UNSUBSCRIBE`.
    Unsubscribe(Unsubscribe),
    /// `ACK`.
    Ack {
        /// Delivery tag.
        tag: u64,
        /// Everything up to and including `tag`.
        multiple: bool,
    },
    /// `NACK`.
    Nack {
        /// Delivery tag.
        tag: u64,
        /// Everything up to and including `tag`.
        multiple: bool,
        /// Back to the queue (else dead-lettered or dropped).
        requeue: bool,
    },
}

/// Checks a client-chosen exchange or queue name.
pub fn validate_name(name: &str, what: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(bad(format!(
            "{what} name must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(bad(format!(
            "{what} name must not contain control characters"
        )));
    }
    if RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(CommandError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Checks a name used to refer to an existing object (reserved names allowed).
fn validate_ref_name(name: &str, what: &str) -> Result<(), CommandError> {
    // Printable ASCII, the usual case, needs no decoding into chars.
    let printable = name.bytes().all(|b| (0x20..0x7f).contains(&b));
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || (!printable && name.chars().any(char::is_control))
    {
        return Err(bad(format!(
            "{what} name must be 1 to {MAX_NAME_BYTES} bytes with no control characters"
        )));
    }
    Ok(())
}

fn json_err(e: serde_json::Error) -> CommandError {
    bad(format!("invalid JSON body: {e}"))
}

/// The JSON string token around `s` (quotes included) in `input`, if `s` is the
/// contents of a string token in it that `serde_json` borrowed: borrowed contents
/// had no escapes, so they hold no `"`, `\` or control character (`serde_json` refuses
/// those raw), and the token is exactly the one `serde_json` would write for `s`.
fn quoted_token<'a>(input: &'a [u8], s: &str) -> Option<&'a [u8]> {
    let start = span_in(input, s.as_bytes())?.start;
    let open = start.checked_sub(1)?;
    let close = start + s.len();
    let quoted = input.get(open) == Some(&b'"') && input.get(close) == Some(&b'"');
    quoted.then(|| input.get(open..close + 1)).flatten()
}

/// A slice of `input` for `s` if `s` points into it, else a copy.
fn share(input: &Bytes, s: &str) -> Bytes {
    match span_in(input, s.as_bytes()) {
        Some(span) => input.slice(span),
        None => Bytes::copy_from_slice(s.as_bytes()),
    }
}

fn decode_string_token<'a>(raw: &'a RawValue, field: &str) -> Result<Cow<'a, str>, CommandError> {
    serde_json::from_str::<Cow<'a, str>>(raw.get())
        .map_err(|_| bad(format!("field {field:?} must be a string")))
}

#[derive(Deserialize)]
struct ExchangeBody<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    durable: Option<bool>,
}

#[derive(Deserialize)]
struct QueueBody<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    durable: Option<bool>,
    max_length: Option<u64>,
    message_ttl_ms: Option<u64>,
    #[serde(borrow)]
    overflow: Option<Cow<'a, str>>,
    #[serde(borrow)]
    dead_letter_exchange: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct BindingBody<'a> {
    #[serde(borrow)]
    exchange_name: Cow<'a, str>,
    #[serde(borrow)]
    queue_name: Cow<'a, str>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(rename = "Key", borrow)]
    key_seed: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    exchange_name: Cow<'a, str>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(rename = "Key", borrow)]
    key_seed: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    confirm: Option<bool>,
    persistent: Option<bool>,
    ttl_ms: Option<u64>,
    #[serde(borrow)]
    headers: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscribeBody<'a> {
    #[serde(borrow)]
    queue_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    exchange_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(rename = "Key", borrow)]
    key_seed: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ack: Option<Cow<'a, str>>,
    prefetch: Option<u32>,
}

#[derive(Deserialize)]
struct UnsubscribeBody<'a> {
    #[serde(borrow)]
    subscription: Option<Cow<'a, str>>,
    #[serde(borrow)]
    queue_name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AckBody {
    delivery_tag: u64,
    multiple: Option<bool>,
    requeue: Option<bool>,
}

/// A WebSocket frame's envelope `{"type": …, "payload": {…}}`, read in one pass.
///
/// When `type` comes before `payload` (as clients write it) a `PUBLISH` payload is
/// decoded in place; otherwise the payload is kept as raw JSON and decoded once its
/// type is known. Either way a message body is scanned once, not once per layer.
struct Envelope<'a> {
    kind: Cow<'a, str>,
    payload: EnvelopePayload<'a>,
}

enum EnvelopePayload<'a> {
    Absent,
    Publish(PublishBody<'a>),
    Raw(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Envelope<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a frame object with \"type\" and \"payload\"")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                use serde::de::Error;
                let mut kind: Option<Cow<'a, str>> = None;
                let mut payload = EnvelopePayload::Absent;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "type" if kind.is_some() => return Err(M::Error::duplicate_field("type")),
                        "type" => kind = Some(map.next_value()?),
                        "payload" if !matches!(payload, EnvelopePayload::Absent) => {
                            return Err(M::Error::duplicate_field("payload"))
                        }
                        "payload" if kind.as_deref() == Some("PUBLISH") => {
                            payload = EnvelopePayload::Publish(map.next_value()?)
                        }
                        "payload" => payload = EnvelopePayload::Raw(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                let kind = kind.ok_or_else(|| M::Error::missing_field("type"))?;
                Ok(Envelope { kind, payload })
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// Decodes `POST /exchanges`.
pub fn decode_exchange(body: &[u8]) -> Result<ExchangeDecl, CommandError> {
    let b: ExchangeBody = serde_json::from_slice(body).map_err(json_err)?;
    validate_name(&b.name, "exchange")?;
    let kind_name = b.kind.ok_or_else(|| bad("field \"type\" is required"))?;
    let kind = ExchangeKind::parse(&kind_name).ok_or_else(|| {
        bad(format!(
            "unknown exchange type {kind_name:?}: use direct, fanout or topic"
        ))
    })?;
    Ok(ExchangeDecl {
        name: b.name.into_owned(),
        kind,
        durable: b.durable.unwrap_or(true),
    })
}

/// Decodes `POST /queues`.
pub fn decode_queue(body: &[u8]) -> Result<QueueDecl, CommandError> {
    let b: QueueBody = serde_json::from_slice(body).map_err(json_err)?;
    validate_name(&b.name, "queue")?;
    let overflow = match b.overflow {
        None => Overflow::default(),
        Some(s) => Overflow::parse(&s).ok_or_else(|| {
            bad(format!(
                "unknown overflow {s:?}: use reject_publish or drop_head"
            ))
        })?,
    };
    if let Some(dlx) = &b.dead_letter_exchange {
        validate_ref_name(dlx, "dead_letter_exchange")?;
    }
    Ok(QueueDecl {
        name: b.name.into_owned(),
        spec: QueueSpec {
            durable: b.durable.unwrap_or(false),
            max_length: b.max_length,
            message_ttl_ms: b.message_ttl_ms,
            overflow,
            dead_letter_exchange: b.dead_letter_exchange.map(Cow::into_owned),
        },
    })
}

/// Decodes `POST /bindings` and `DELETE /bindings` (`key` or the seed's `Key`).
pub fn decode_binding(body: &[u8]) -> Result<BindingDecl, CommandError> {
    let b: BindingBody = serde_json::from_slice(body).map_err(json_err)?;
    validate_ref_name(&b.exchange_name, "exchange")?;
    validate_ref_name(&b.queue_name, "queue")?;
    let key = b
        .key
        .or(b.key_seed)
        .map(Cow::into_owned)
        .unwrap_or_default();
    Ok(BindingDecl {
        exchange: b.exchange_name.into_owned(),
        queue: b.queue_name.into_owned(),
        key,
    })
}

/// Decodes a publish body; `input` is the buffer `body` lives in, so that the payload
/// and strings become slices of it.
pub fn decode_publish(input: &Bytes, max_payload: usize) -> Result<Publish, CommandError> {
    match scan::publish_body(input, max_payload) {
        Some(p) => Ok(p),
        None => decode_publish_json(input, max_payload),
    }
}

/// [`decode_publish`] without the fast path: `serde_json` decides everything.
fn decode_publish_json(input: &Bytes, max_payload: usize) -> Result<Publish, CommandError> {
    let b: PublishBody = serde_json::from_slice(input).map_err(json_err)?;
    publish_from(input, b, max_payload)
}

fn publish_from(
    input: &Bytes,
    b: PublishBody<'_>,
    max_payload: usize,
) -> Result<Publish, CommandError> {
    validate_ref_name(&b.exchange_name, "exchange")?;
    let payload = b
        .payload
        .ok_or_else(|| bad("field \"payload\" is required"))?;
    let payload_text = payload.get();
    if payload_text.len() > max_payload {
        return Err(CommandError::PayloadTooLarge {
            size: payload_text.len(),
            limit: max_payload,
        });
    }
    // The key's token as sent, and its decoded text: a string token without escapes is
    // its own text between the quotes (the RawValue parse already checked it); only
    // escapes need a real decode.
    let key: Option<(&str, Cow<'_, str>)> = match b.key.or(b.key_seed) {
        None => None,
        Some(raw) => {
            let token = raw.get();
            let plain = token
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .filter(|inner| memchr::memchr(b'\\', inner.as_bytes()).is_none());
            let decoded = match plain {
                Some(inner) => Cow::Borrowed(inner),
                None => decode_string_token(raw, "key")?,
            };
            Some((token, decoded))
        }
    };
    let headers = match b.headers {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => {
            let _: HashMap<Cow<'_, str>, Cow<'_, str>> = serde_json::from_str(raw.get())
                .map_err(|_| bad("field \"headers\" must be an object of string values"))?;
            Some(share(input, raw.get()))
        }
    };
    let reference = match b.reference {
        None => None,
        Some(raw) => {
            decode_string_token(raw, "ref")?;
            Some(share(input, raw.get()))
        }
    };
    // The exchange's token as the client wrote it when it had no escapes (then it is
    // the token the server would write); else the server's own.
    let own_token;
    let exchange_json = match quoted_token(input, &b.exchange_name) {
        Some(token) => token,
        None => {
            own_token = crate::routing::json_string(&b.exchange_name);
            &own_token[..]
        }
    };
    let (key_json, key) = match &key {
        Some((token, decoded)) => (Some(token.as_bytes()), decoded.as_bytes()),
        None => (None, &b""[..]),
    };
    Ok(Publish {
        text: MessageText::new(input, exchange_json, key_json, key, payload_text.as_bytes()),
        confirm: b.confirm.unwrap_or(false),
        persistent: b.persistent.unwrap_or(true),
        ttl_ms: b.ttl_ms,
        headers,
        reference,
    })
}

/// Best effort: the `ref` of a `PUBLISH` frame that failed to decode, so the `ERROR`
/// can carry it.
pub fn salvage_ref(frame: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Inner<'a> {
        #[serde(rename = "ref", borrow)]
        reference: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Outer<'a> {
        #[serde(borrow)]
        payload: Option<&'a RawValue>,
    }
    let outer: Outer = serde_json::from_slice(frame).ok()?;
    let inner: Inner = serde_json::from_str(outer.payload?.get()).ok()?;
    let raw = inner.reference?;
    serde_json::from_str::<Cow<'_, str>>(raw.get()).ok()?;
    Some(Bytes::copy_from_slice(raw.get().as_bytes()))
}

/// Decodes one WebSocket text frame `{"type": …, "payload": {…}}`, taking it (a
/// publish keeps the frame's buffer as its text). An error gives the frame back, so
/// the caller can still quote the client's `ref`.
pub fn decode_frame(
    frame: Utf8Bytes,
    max_payload: usize,
) -> Result<Command, (CommandError, Utf8Bytes)> {
    match scan::publish_frame(frame, max_payload) {
        Ok(p) => Ok(Command::Publish(p)),
        Err(frame) => decode_frame_json(&frame, max_payload).map_err(|e| (e, frame)),
    }
}

/// [`decode_frame`] without the fast path: `serde_json` decides everything.
fn decode_frame_json(frame: &Utf8Bytes, max_payload: usize) -> Result<Command, CommandError> {
    let input: &Bytes = frame.as_ref();
    let env: Envelope =
        serde_json::from_str(frame.as_str()).map_err(|e| bad(format!("invalid frame: {e}")))?;
    let payload = match env.payload {
        // Only produced when `type` was already "PUBLISH" (and `type` cannot repeat).
        EnvelopePayload::Publish(b) => {
            return Ok(Command::Publish(publish_from(input, b, max_payload)?))
        }
        EnvelopePayload::Raw(raw) => raw.get(),
        EnvelopePayload::Absent => "{}",
    };
    let p = payload.as_bytes();
    match env.kind.as_ref() {
        "PUBLISH" => {
            let b: PublishBody = serde_json::from_str(payload).map_err(json_err)?;
            Ok(Command::Publish(publish_from(input, b, max_payload)?))
        }
        "SUBSCRIBE" => {
            let b: SubscribeBody = serde_json::from_slice(p).map_err(json_err)?;
            let ack = match b.ack.as_deref() {
                None | Some("auto") => AckMode::Auto,
                Some("manual") => AckMode::Manual,
                Some(other) => {
                    return Err(bad(format!(
                        "unknown ack mode {other:?}: use auto or manual"
                    )))
                }
            };
            let target = match (b.queue_name, b.exchange_name) {
                (Some(q), None) => {
                    validate_ref_name(&q, "queue")?;
                    SubscribeTarget::Queue(q.into_owned())
                }
                (None, Some(x)) => {
                    validate_ref_name(&x, "exchange")?;
                    SubscribeTarget::Exchange {
                        exchange: x.into_owned(),
                        key: b
                            .key
                            .or(b.key_seed)
                            .map(Cow::into_owned)
                            .unwrap_or_default(),
                    }
                }
                (Some(_), Some(_)) => {
                    return Err(bad("give either queue_name or exchange_name, not both"))
                }
                (None, None) => return Err(bad("SUBSCRIBE needs queue_name or exchange_name")),
            };
            Ok(Command::Subscribe(Subscribe {
                target,
                ack,
                prefetch: b.prefetch.unwrap_or(DEFAULT_PREFETCH),
            }))
        }
        "UNSUBSCRIBE" => {
            let b: UnsubscribeBody = serde_json::from_slice(p).map_err(json_err)?;
            match (b.subscription, b.queue_name) {
                (Some(s), _) => Ok(Command::Unsubscribe(Unsubscribe::Subscription(
                    s.into_owned(),
                ))),
                (None, Some(q)) => Ok(Command::Unsubscribe(Unsubscribe::Queue(q.into_owned()))),
                (None, None) => Err(bad("UNSUBSCRIBE needs subscription or queue_name")),
            }
        }
        "ACK" => {
            let b: AckBody = serde_json::from_slice(p).map_err(json_err)?;
            Ok(Command::Ack {
                tag: b.delivery_tag,
                multiple: b.multiple.unwrap_or(false),
            })
        }
        "NACK" => {
            let b: AckBody = serde_json::from_slice(p).map_err(json_err)?;
            Ok(Command::Nack {
                tag: b.delivery_tag,
                multiple: b.multiple.unwrap_or(false),
                requeue: b.requeue.unwrap_or(true),
            })
        }
        other => Err(bad(format!("unknown frame type {other:?}"))),
    }
}

/// Maps an HTTP method and path (segments already percent-decoded) and body to a command.
pub fn decode_http(
    method: &str,
    segments: &[String],
    body: &Bytes,
    max_payload: usize,
) -> Result<Command, CommandError> {
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, segs.as_slice()) {
        ("GET", []) => Ok(Command::Console),
        ("GET", ["healthz"]) => Ok(Command::Health),
        ("GET", ["metrics"]) => Ok(Command::Metrics),
        ("POST", ["exchanges"]) => Ok(Command::DeclareExchange(decode_exchange(body)?)),
        ("GET", ["exchanges"]) => Ok(Command::ListExchanges),
        ("GET", ["exchanges", name]) => Ok(Command::GetExchange((*name).to_owned())),
        ("DELETE", ["exchanges", name]) => Ok(Command::DeleteExchange((*name).to_owned())),
        ("POST", ["queues"]) => Ok(Command::DeclareQueue(decode_queue(body)?)),
        ("GET", ["queues"]) => Ok(Command::ListQueues),
        ("GET", ["queues", name]) => Ok(Command::GetQueue((*name).to_owned())),
        ("DELETE", ["queues", name]) => Ok(Command::DeleteQueue((*name).to_owned())),
        ("POST", ["queues", name, "purge"]) => Ok(Command::PurgeQueue((*name).to_owned())),
        ("POST", ["bindings"]) => Ok(Command::Bind(decode_binding(body)?)),
        ("GET", ["bindings"]) => Ok(Command::ListBindings),
        ("DELETE", ["bindings"]) => Ok(Command::Unbind(decode_binding(body)?)),
        ("POST", ["publish"]) => Ok(Command::Publish(decode_publish(body, max_payload)?)),
        (
            _,
            []
            | ["healthz"]
            | ["metrics"]
            | ["exchanges"]
            | ["exchanges", _]
            | ["queues"]
            | ["queues", _]
            | ["queues", _, "purge"]
            | ["bindings"]
            | ["publish"]
            | ["ws"],
        ) => Err(CommandError::MethodNotAllowed),
        _ => Err(CommandError::NoRoute),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(b: &Bytes) -> Utf8Bytes {
        Utf8Bytes::try_from(b.clone()).unwrap()
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn publish_keeps_payload_bytes_and_slices_input() {
        let input = b(
            r#"{"exchange_name":"x","Key":"a.b","payload": {"b": 1,  "a":[1,2 ,3]} ,"confirm":true}"#,
        );
        let p = decode_publish(&input, 1024).unwrap();
        assert_eq!(p.text.body(), br#"{"b": 1,  "a":[1,2 ,3]}"#);
        assert_eq!(p.text.routing_key(), b"a.b");
        assert_eq!(p.text.routing_key_json(), b"\"a.b\"");
        assert!(p.confirm && p.persistent);
        // The payload is a slice of the input, not a copy.
        let base = input.as_ptr() as usize;
        let at = p.text.body().as_ptr() as usize;
        assert!(at > base && at < base + input.len());
    }

    #[test]
    fn publish_escaped_key_is_decoded() {
        let input = b(r#"{"exchange_name":"x","key":"a\u002eb","payload":1}"#);
        let p = decode_publish(&input, 1024).unwrap();
        assert_eq!(p.text.routing_key(), b"a.b");
        assert_eq!(p.text.routing_key_json(), br#""a\u002eb""#);
    }

    #[test]
    fn publish_errors() {
        assert_eq!(
            decode_publish(&b(r#"{"exchange_name":"x"}"#), 10)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            decode_publish(&b(r#"{"exchange_name":"x","payload":"0123456789abc"}"#), 10)
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(
            decode_publish(
                &b(r#"{"exchange_name":"x","payload":1,"headers":{"a":1}}"#),
                10
            )
            .unwrap_err()
            .status(),
            400
        );
        assert_eq!(
            decode_publish(&b(r#"not json"#), 10).unwrap_err().code(),
            "bad_request"
        );
        assert_eq!(
            decode_publish(&b(r#"{"exchange_name":"x","payload":1,"key":5}"#), 10)
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(matches!(
            decode_exchange(br#"{"name":"amq.x","type":"direct"}"#),
            Err(CommandError::Reserved(_))
        ));
        assert!(matches!(
            decode_queue(br#"{"name":"pubsub.q"}"#),
            Err(CommandError::Reserved(_))
        ));
        assert_eq!(decode_queue(br#"{"name":""}"#).unwrap_err().status(), 400);
        assert_eq!(
            decode_queue(br#"{"name":"a\u0001b"}"#)
                .unwrap_err()
                .status(),
            400
        );
        let long = format!(r#"{{"name":"{}"}}"#, "x".repeat(256));
        assert_eq!(decode_queue(long.as_bytes()).unwrap_err().status(), 400);
        assert_eq!(
            decode_exchange(br#"{"name":"x","type":"headers"}"#)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            decode_exchange(br#"{"name":"x"}"#).unwrap_err().status(),
            400
        );
        let x = decode_exchange(br#"{"name":"x","type":"topic"}"#).unwrap();
        assert!(x.durable);
        assert_eq!(x.kind, ExchangeKind::Topic);
    }

    #[test]
    fn bindings_accept_seed_key() {
        let d = decode_binding(br#"{"exchange_name":"x","queue_name":"q","Key":"k"}"#).unwrap();
        assert_eq!(d.key, "k");
        let d = decode_binding(br#"{"exchange_name":"x","queue_name":"q"}"#).unwrap();
        assert_eq!(d.key, "");
    }

    #[test]
    fn frames_decode() {
        let f =
            b(r#"{"type":"SUBSCRIBE","payload":{"queue_name":"q","ack":"manual","prefetch":5}}"#);
        match decode_frame(u(&f), 10).unwrap() {
            Command::Subscribe(s) => {
                assert_eq!(s.target, SubscribeTarget::Queue("q".into()));
                assert_eq!(s.ack, AckMode::Manual);
                assert_eq!(s.prefetch, 5);
            }
            other => panic!("{other:?}"),
        }
        let f = b(r#"{"type":"PUBLISH","payload":{"exchange_name":"x","payload":[1],"ref":"r1"}}"#);
        match decode_frame(u(&f), 10).unwrap() {
            Command::Publish(p) => {
                assert_eq!(p.text.body(), b"[1]");
                assert_eq!(p.reference.as_deref(), Some(&b"\"r1\""[..]));
            }
            other => panic!("{other:?}"),
        }
        let f = b(r#"{"type":"NACK","payload":{"delivery_tag":3,"requeue":false}}"#);
        assert!(matches!(
            decode_frame(u(&f), 10).unwrap(),
            Command::Nack {
                tag: 3,
                multiple: false,
                requeue: false
            }
        ));
        assert!(decode_frame(u(&b(r#"{"type":"NOPE"}"#)), 10).is_err());
        assert!(decode_frame(u(&b(r#"[1,2]"#)), 10).is_err());
        assert!(
            decode_frame(u(&b(r#"{"type":"ACK","payload":{"delivery_tag":-1}}"#)), 10).is_err()
        );
        let bad = b(r#"{"type":"PUBLISH","payload":{"ref":"r9"}}"#);
        assert!(decode_frame(u(&bad), 10).is_err());
        assert_eq!(salvage_ref(&bad).as_deref(), Some(&b"\"r9\""[..]));
    }

    #[test]
    fn http_routes() {
        let body = Bytes::new();
        let seg = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(
            matches!(decode_http("GET", &seg(&["queues", "a b"]), &body, 10).unwrap(), Command::GetQueue(n) if n == "a b")
        );
        assert!(matches!(
            decode_http("POST", &seg(&["queues", "q", "purge"]), &body, 10).unwrap(),
            Command::PurgeQueue(_)
        ));
        assert_eq!(
            decode_http("PUT", &seg(&["queues"]), &body, 10)
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            decode_http("GET", &seg(&["nope"]), &body, 10)
                .unwrap_err()
                .status(),
            404
        );
    }
}
