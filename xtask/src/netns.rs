//! Hosts for the scale-out topology: Linux network namespaces joined by veth pairs to a bridge,
//! made with iproute2's `ip` and removed again when the [`Network`] is dropped.
//!
//! The machine itself (the root namespace) is the gateway host, on the bridge's first address;
//! each [`Host`] is a namespace of its own with one address on the bridge's subnet, its own
//! loopback and its own TCP stack. A program runs on a host through `ip netns exec`, which
//! execs it in place, so the process id is the program's and signals reach it directly.
//!
//! Only root can make namespaces; [`Network::available`] says whether this process can, and
//! callers fall back to loopback ports otherwise.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One host: a network namespace with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The namespace's name (`ip netns list`).
    pub namespace: String,
    /// Its address on the bridge's /24.
    pub address: Ipv4Addr,
}

impl Host {
    /// Whether a TCP connection from this host to `to` opens within 5 s (bash's `/dev/tcp`).
    pub async fn reaches(&self, to: std::net::SocketAddr) -> bool {
        let mut command = self.command("bash");
        command
            .args(["-c", &format!("exec 3<>/dev/tcp/{}/{}", to.ip(), to.port())])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let status = tokio::time::timeout(std::time::Duration::from_secs(5), command.status());
        matches!(status.await, Ok(Ok(status)) if status.success())
    }

    /// A command that runs `program` on this host.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command.args(["netns", "exec", &self.namespace, program]);
        command
    }
}

/// A bridge in the root namespace and the hosts attached to it; removed when dropped.
#[derive(Debug)]
pub struct Network {
    bridge: String,
    /// The root namespace's address on the bridge: how the hosts reach the machine's servers.
    pub gateway: Ipv4Addr,
    hosts: Vec<Host>,
}

impl Network {
    /// Whether this process can make namespaces: it runs as root, and making (and removing) a
    /// scratch one works (root in a container without the capabilities cannot).
    pub fn available() -> bool {
        if !crate::pg::running_as_root().unwrap_or(false) {
            return false;
        }
        let probe = format!("dash-probe-{}", std::process::id());
        let made = ip(&["netns", "add", &probe]).is_ok();
        made && ip(&["netns", "del", &probe]).is_ok()
    }

    /// Makes a bridge `dash<tag>br` with `10.213.<subnet>.1/24` (a subnet no interface here is
    /// on) and one namespace per name in `names` (`dash<tag>-<name>`), at `.10`, `.11`, …, each
    /// joined to the bridge by a veth pair. Leftovers of the same names (a run that was killed:
    /// processes, namespaces, interfaces) are removed first.
    ///
    /// # Errors
    ///
    /// When a name is too long for an interface (the tag makes it so), or `ip` fails; what was
    /// made so far is removed again.
    pub fn create(tag: u16, names: &[&str]) -> Result<Self> {
        let bridge = format!("dash{tag}br");
        let namespaces: Vec<String> = names.iter().map(|n| format!("dash{tag}-{n}")).collect();
        let veths: Vec<String> = (0..names.len()).map(|i| format!("dash{tag}v{i}")).collect();
        if let Some(long) = veths.iter().chain([&bridge]).find(|name| name.len() > 15) {
            bail!("interface name {long} is longer than 15 bytes");
        }
        // What a run that was killed left: its processes, namespaces and interfaces.
        for namespace in &namespaces {
            kill_everything_in(namespace);
            let _ = ip(&["netns", "del", namespace]);
        }
        for link in veths.iter().chain([&bridge]) {
            let _ = ip(&["link", "del", link]);
        }
        // A /24 in 10.213.0.0/16 that no interface of this machine is on (another topology's
        // bridge, a VPN), starting from one the tag picks.
        let addresses = Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .context("cannot run ip (Debian package iproute2)")?;
        let addresses = String::from_utf8_lossy(&addresses.stdout).into_owned();
        let third = (0..250)
            .map(|k| u8::try_from((usize::from(tag) + k) % 250 + 1).unwrap_or(1))
            .find(|third| !addresses.contains(&format!(" 10.213.{third}.")))
            .context("every 10.213.x.0/24 subnet is in use")?;
        let mut network = Self {
            bridge,
            gateway: Ipv4Addr::new(10, 213, third, 1),
            hosts: Vec::new(),
        };
        let prefixed: Vec<(String, Ipv4Addr)> = namespaces
            .into_iter()
            .enumerate()
            .map(|(i, namespace)| {
                let last = u8::try_from(10 + i).context("at most 240 hosts")?;
                Ok((namespace, Ipv4Addr::new(10, 213, third, last)))
            })
            .collect::<Result<_>>()?;

        ip(&["link", "add", &network.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", network.gateway),
            "dev",
            &network.bridge,
        ])?;
        ip(&["link", "set", &network.bridge, "up"])?;
        for ((namespace, address), veth) in prefixed.into_iter().zip(&veths) {
            ip(&["netns", "add", &namespace])?;
            network.hosts.push(Host {
                namespace: namespace.clone(),
                address,
            });
            ip(&[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
            ])?;
            ip(&["link", "set", veth, "master", &network.bridge, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["-n", namespace.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
        }
        Ok(network)
    }

    /// The hosts, in the order of the names given to [`Network::create`].
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the pair, and with it the root end, once no
        // process is left in it.
        for host in &self.hosts {
            kill_everything_in(&host.namespace);
            if let Err(e) = ip(&["netns", "del", &host.namespace]) {
                eprintln!("warning: {e:#}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Kills (SIGKILL) whatever still runs in `namespace`, if it exists.
fn kill_everything_in(namespace: &str) {
    let Ok(output) = Command::new("ip")
        .args(["netns", "pids", namespace])
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (Debian package iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use nix::sched::{CloneFlags, setns};

    use super::*;

    /// Runs `f` on a thread that has joined `host`'s network namespace: the sockets it makes
    /// belong to that host.
    fn on<T: Send + 'static>(host: &Host, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", host.namespace);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn exchange(listener: &TcpListener, to: SocketAddr) -> String {
        let mut client = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        client.write_all(b"ping").unwrap();
        let (mut server, from) = listener.accept().unwrap();
        let mut text = [0; 4];
        server.read_exact(&mut text).unwrap();
        format!("{} from {}", String::from_utf8_lossy(&text), from.ip())
    }

    #[test]
    fn hosts_reach_each_other_and_the_machine_and_are_removed_when_dropped() {
        if !Network::available() {
            // Not root, or no right to make namespaces: the topology runs on loopback ports, and
            // making a network fails with an error rather than half-way.
            assert!(Network::create(39_999, &["a"]).is_err());
            return;
        }
        // A tag of this process's own, so a running cluster (8443) or another run is not hit.
        let tag = u16::try_from(std::process::id() % 20_000 + 30_000).unwrap();
        let network = Network::create(tag, &["a", "b"]).unwrap();
        let [a, b] = [network.hosts()[0].clone(), network.hosts()[1].clone()];
        assert_eq!(a.namespace, format!("dash{tag}-a"));
        // A listener on host b, reached from host a and from the machine: each seen with its
        // own address.
        let b_address = b.address;
        let listener = on(&b, move || TcpListener::bind((b_address, 0)).unwrap());
        let to = listener.local_addr().unwrap();
        let listener = std::sync::Arc::new(listener);
        let from_a = {
            let listener = std::sync::Arc::clone(&listener);
            on(&a, move || exchange(&listener, to))
        };
        assert_eq!(from_a, format!("ping from {}", a.address));
        assert_eq!(
            exchange(&listener, to),
            format!("ping from {}", network.gateway)
        );
        // Host b's loopback is its own: nothing of the machine listens there.
        let machine = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = machine.local_addr().unwrap().port();
        let refused = on(&b, move || TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(refused);

        let bridge = network.bridge.clone();
        drop(network);
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(!listed.contains(&format!("dash{tag}-")), "{listed}");
        let links = Command::new("ip")
            .args(["link", "show", &bridge])
            .output()
            .unwrap();
        assert!(
            !links.status.success(),
            "the bridge {bridge} is still there"
        );
    }
}
