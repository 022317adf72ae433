//! A TCP proxy between chatshard and one shard, for network faults: pass,
//! delay every packet, reset every connection, or black-hole the traffic.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Every chunk is held this long before it is forwarded.
    Delay(Duration),
    /// Every connection, open or new, is closed with a RST.
    Reset,
    /// Nothing is forwarded; connections stay open and silent.
    Blackhole,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, rx) = watch::channel(Mode::Pass);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let rx = rx.clone();
                tokio::spawn(async move {
                    if *rx.borrow() == Mode::Reset {
                        reset(client, None);
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    pump(client, server, rx).await;
                });
            }
        });
        Self { port, mode, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

fn reset(a: TcpStream, b: Option<TcpStream>) {
    let _ = a.set_zero_linger();
    if let Some(b) = &b {
        let _ = b.set_zero_linger();
    }
}

enum Event {
    FromClient(usize),
    FromServer(usize),
    Closed,
    ModeChanged,
}

async fn pump(mut client: TcpStream, mut server: TcpStream, mut rx: watch::Receiver<Mode>) {
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut sbuf = vec![0u8; 16 * 1024];
    loop {
        if *rx.borrow_and_update() == Mode::Reset {
            return reset(client, Some(server));
        }
        let event = tokio::select! {
            r = client.read(&mut cbuf) => match r { Ok(0) | Err(_) => Event::Closed, Ok(n) => Event::FromClient(n) },
            r = server.read(&mut sbuf) => match r { Ok(0) | Err(_) => Event::Closed, Ok(n) => Event::FromServer(n) },
            r = rx.changed() => if r.is_err() { Event::Closed } else { Event::ModeChanged },
        };
        let forwarded = match event {
            Event::Closed => return,
            Event::ModeChanged => continue,
            Event::FromClient(n) => forward(&mut server, &cbuf[..n], &mut rx).await,
            Event::FromServer(n) => forward(&mut client, &sbuf[..n], &mut rx).await,
        };
        match forwarded {
            Forwarded::Yes => {}
            Forwarded::Reset => return reset(client, Some(server)),
            Forwarded::Closed => return,
        }
    }
}

enum Forwarded {
    Yes,
    Reset,
    Closed,
}

async fn forward(dst: &mut TcpStream, data: &[u8], rx: &mut watch::Receiver<Mode>) -> Forwarded {
    loop {
        let mode = *rx.borrow_and_update();
        match mode {
            Mode::Pass => break,
            Mode::Delay(d) => {
                tokio::time::sleep(d).await;
                break;
            }
            Mode::Reset => return Forwarded::Reset,
            Mode::Blackhole => {
                if rx.changed().await.is_err() {
                    return Forwarded::Closed;
                }
            }
        }
    }
    match dst.write_all(data).await {
        Ok(()) => Forwarded::Yes,
        Err(_) => Forwarded::Closed,
    }
}
