//! API tests against a real server on 127.0.0.1 (see `helpers` for the scripted backend).

mod helpers;
mod http;
mod websocket;
