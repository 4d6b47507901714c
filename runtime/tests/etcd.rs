//! etcd registration and discovery against a real `etcd` (the Debian etcd-server
//! package, installed by scripts/setup-tests.sh), started here on free loopback ports with
//! a temporary data directory, stopped and restarted by the tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynamo_runtime::discovery::{
    instance_ids, instance_key, instances_prefix, EtcdClient, PrefixWatch, Registration,
    RegistrationConfig,
};
use dynamo_runtime::transport::nats::EndpointAddress;

const LIMIT: Duration = Duration::from_secs(20);

fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
            .into_iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed, and these tests need a real one: \
         run scripts/setup-tests.sh (it installs the Debian package)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// An etcd on free loopback ports with its own data directory; killed on drop.
struct EtcdProcess {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl EtcdProcess {
    fn start() -> Self {
        let mut etcd = EtcdProcess {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        etcd.spawn();
        etcd
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(find_binary("etcd"))
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = Instant::now() + LIMIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts with nothing of its former data: every lease and key is gone.
    fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
        self.spawn();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client(etcd: &EtcdProcess) -> EtcdClient {
    EtcdClient::new(&etcd.url(), Duration::from_secs(1)).expect("client")
}

fn quick() -> RegistrationConfig {
    RegistrationConfig {
        ttl: Duration::from_secs(2),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
    }
}

/// Waits until the watched instance ids are `want`.
async fn wait_ids(watch: &PrefixWatch, want: &[u64]) {
    let mut rx = watch.snapshots();
    // `is_ok` at once: a held `Ref` would block the watch's sender.
    let got = tokio::time::timeout(LIMIT, rx.wait_for(|s| instance_ids(s) == want))
        .await
        .is_ok();
    assert!(
        got,
        "instances never became {want:?}; last: {:?}",
        instance_ids(&watch.current())
    );
}

fn decode() -> EndpointAddress {
    EndpointAddress::new("test", "g", "decode", "generate")
}

#[tokio::test]
async fn registrations_appear_and_leave_in_the_watched_set() {
    let etcd = EtcdProcess::start();
    let watch = PrefixWatch::start(client(&etcd), instances_prefix(&decode()));
    let a = Registration::start(
        client(&etcd),
        instance_key(&decode(), 0xa),
        b"a".to_vec(),
        quick(),
    );
    let b = Registration::start(
        client(&etcd),
        instance_key(&decode(), 0xb),
        b"b".to_vec(),
        quick(),
    );
    assert!(a.wait_registered(LIMIT).await, "{:?}", a.status().borrow());
    assert!(b.wait_registered(LIMIT).await);
    wait_ids(&watch, &[0xa, 0xb]).await;
    assert_eq!(
        watch.current().get(&instance_key(&decode(), 0xa)),
        Some(&b"a".to_vec())
    );

    // Deregistering removes the key at once.
    a.deregister().await;
    wait_ids(&watch, &[0xb]).await;

    // A process that stops refreshing (dropped without revoking, as in a crash) leaves
    // within the TTL.
    let dropped = Instant::now();
    drop(b);
    wait_ids(&watch, &[]).await;
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "{:?}",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn an_etcd_outage_restarts_nothing_and_registration_comes_back() {
    let mut etcd = EtcdProcess::start();
    let watch = PrefixWatch::start(client(&etcd), instances_prefix(&decode()));
    let reg = Registration::start(
        client(&etcd),
        instance_key(&decode(), 0x7),
        b"w".to_vec(),
        quick(),
    );
    assert!(reg.wait_registered(LIMIT).await);
    wait_ids(&watch, &[0x7]).await;

    // etcd goes away for longer than the TTL: the watcher keeps what it knew (routing goes
    // on), the registration reports the outage and keeps trying.
    etcd.stop();
    let mut status = reg.status();
    let lost = tokio::time::timeout(LIMIT, status.wait_for(|s| !s.registered))
        .await
        .is_ok();
    assert!(lost, "the outage was never noticed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        instance_ids(&watch.current()),
        vec![0x7],
        "routing keeps its instances"
    );

    // Same data back: the key is there again (the old lease or a new one).
    etcd.spawn();
    assert!(
        reg.wait_registered(LIMIT).await,
        "{:?}",
        reg.status().borrow()
    );
    wait_ids(&watch, &[0x7]).await;

    // etcd back with nothing (data lost): the same key is put again under a new lease,
    // and the watcher, resyncing, sees it.
    let before = reg.status().borrow().registrations;
    etcd.restart_empty();
    let mut status = reg.status();
    let again = tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| s.registered && s.registrations > before),
    )
    .await
    .is_ok();
    assert!(again, "never re-registered: {:?}", reg.status().borrow());
    wait_ids(&watch, &[0x7]).await;
    let fresh = client(&etcd)
        .range_prefix(&instances_prefix(&decode()))
        .await
        .expect("range");
    assert_eq!(fresh.0.len(), 1, "the key is really in the new etcd");
    assert_eq!(fresh.0[0].value, b"w".to_vec());
}
