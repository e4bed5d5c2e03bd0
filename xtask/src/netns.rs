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
    /// Whether this process can make namespaces: it runs as root and `ip` works.
    pub fn available() -> bool {
        crate::pg::running_as_root().unwrap_or(false)
            && Command::new("ip")
                .args(["netns", "list"])
                .output()
                .is_ok_and(|output| output.status.success())
    }

    /// Makes a bridge `dash<tag>br` with `10.213.<subnet>.1/24` and one namespace per name in
    /// `names` (`dash<tag>-<name>`), at `.10`, `.11`, …, each joined to the bridge by a veth pair.
    /// Leftovers of the same names (a run that was killed) are removed first.
    ///
    /// # Errors
    ///
    /// When a name is too long for an interface (the tag makes it so), or `ip` fails; what was
    /// made so far is removed again.
    pub fn create(tag: u16, names: &[&str]) -> Result<Self> {
        let third = tag % 250 + 1;
        let bridge = format!("dash{tag}br");
        let mut network = Self {
            bridge,
            gateway: Ipv4Addr::new(10, 213, u8::try_from(third).unwrap_or(1), 1),
            hosts: Vec::new(),
        };
        let [a, b, c, _] = network.gateway.octets();
        let prefixed: Vec<(String, Ipv4Addr)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let last = u8::try_from(10 + i).context("at most 240 hosts")?;
                Ok((format!("dash{tag}-{name}"), Ipv4Addr::new(a, b, c, last)))
            })
            .collect::<Result<_>>()?;
        for (namespace, _) in &prefixed {
            let _ = ip(&["netns", "del", namespace]);
        }
        let _ = ip(&["link", "del", &network.bridge]);

        ip(&["link", "add", &network.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", network.gateway),
            "dev",
            &network.bridge,
        ])?;
        ip(&["link", "set", &network.bridge, "up"])?;
        for (i, (namespace, address)) in prefixed.into_iter().enumerate() {
            // The root end of the pair; its name must fit 15 bytes.
            let veth = format!("dash{tag}v{i}");
            if veth.len() > 15 {
                bail!("interface name {veth} is longer than 15 bytes");
            }
            ip(&["netns", "add", &namespace])?;
            network.hosts.push(Host {
                namespace: namespace.clone(),
                address,
            });
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
            ])?;
            ip(&["link", "set", &veth, "master", &network.bridge, "up"])?;
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
        // Deleting a namespace deletes its end of the pair, and with it the root end.
        for host in &self.hosts {
            if let Err(e) = ip(&["netns", "del", &host.namespace]) {
                eprintln!("warning: {e:#}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("warning: {e:#}");
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
            // Not root: the topology runs on loopback ports, and so does nothing here.
            assert!(!crate::pg::running_as_root().unwrap() || Command::new("ip").output().is_err());
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
