//! switchyard: a WebSocket gateway that delivers channel publications in order,
//! exactly once per connection, with replay after reconnect.
//!
//! The layout follows the domain: a [`node::Node`] holds the [`hub::Hub`] (local
//! subscriptions) and an [`engine::Engine`] (broker, presence, cursors); each
//! client connection is a [`session`] with a bounded outbox; [`server`] speaks
//! HTTP and upgrades `/ws`; [`protocol`] is the wire format.

pub mod auth;
pub mod channel;
pub mod clock;
pub mod config;
pub mod connections;
pub mod engine;
pub mod feed;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod request;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
