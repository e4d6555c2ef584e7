//! A fault-injecting TCP proxy: the link between regions, or between clients and a node.
//! It can cut the link (close every connection, refuse new ones), slow it (a delay per
//! chunk), make it lossy (reset connections at random, seeded) and reset every open
//! connection at once.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::rng::Rng;

#[derive(Debug)]
struct State {
    targets: Vec<u16>,
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// Chance, per thousand chunks, that a connection is reset.
    loss_per_mille: AtomicU64,
    open: Mutex<Vec<TcpStream>>,
    rng: Mutex<Rng>,
    resets: AtomicU64,
}

/// A running proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to the first target that answers.
    pub fn start(targets: Vec<u16>, seed: u64) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            targets,
            cut: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            loss_per_mille: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
            rng: Mutex::new(Rng::new(seed)),
            resets: AtomicU64::new(0),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if s.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Some(server) = s.targets.iter().find_map(|p| TcpStream::connect(("127.0.0.1", *p)).ok())
                else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c), Ok(sv)) = (client.try_clone(), server.try_clone()) {
                    let mut open = s.open.lock().unwrap_or_else(|p| p.into_inner());
                    open.retain(|t| t.peer_addr().is_ok());
                    open.push(c);
                    open.push(sv);
                }
                for (from, to) in
                    [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())]
                {
                    let (Ok(from), Ok(to)) = (from, to) else { continue };
                    let s = s.clone();
                    std::thread::spawn(move || pump(from, to, &s));
                }
            }
        });
        Ok(Proxy { port, state })
    }

    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.reset_all();
    }

    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.delay_ms.store(0, Ordering::SeqCst);
        self.state.loss_per_mille.store(0, Ordering::SeqCst);
    }

    pub fn slow(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn lossy(&self, per_mille: u64) {
        self.state.loss_per_mille.store(per_mille.min(1000), Ordering::SeqCst);
    }

    /// Resets every open connection (new ones are accepted).
    pub fn reset_all(&self) {
        for s in self.state.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.state.resets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resets(&self) -> u64 {
        self.state.resets.load(Ordering::Relaxed)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, s: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if s.cut.load(Ordering::SeqCst) {
            break;
        }
        let loss = s.loss_per_mille.load(Ordering::Relaxed);
        if loss > 0 && s.rng.lock().unwrap_or_else(|p| p.into_inner()).below(1000) < loss {
            s.resets.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let delay = s.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
