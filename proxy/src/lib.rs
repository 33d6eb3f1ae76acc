//! dbproxy: a MySQL/MariaDB connection proxy that authenticates clients itself and serves
//! them over a pool of warm backend connections.

pub mod admin;
pub mod auth;
pub mod aws;
pub mod backend_conn;
pub mod clients;
pub mod config;
pub mod conn;
pub mod fuzzing;
pub mod guard;
pub mod io;
pub mod mysql;
pub mod pool;
pub mod reload;
pub mod runtime;
pub mod secrets;
pub mod session;
pub mod stats;
pub mod tls;
pub mod topology;
