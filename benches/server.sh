# Sourced by the benchmark scripts: checks that a port is free before a server is started on it,
# and waits, bounded, for that server to be ready.

# The checks below ask with curl; without it every port would look free and no server ready.
command -v curl >/dev/null || { echo "the benchmark scripts need curl (deploy/setup.sh installs it)" >&2; exit 1; }

# Fails when something already answers on port $1: the figures would be that server's.
port_free() {
    if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1/"; then
        echo "port $1 is in use: stop what listens there, or pick other ports (see the script's usage)" >&2
        exit 1
    fi
}

# Waits up to 60 s for URL $1 to answer 2xx; fails, naming log $3, when server process $2 exits
# first or the time runs out.
wait_ready() {
    for _ in $(seq 1 120); do
        curl -sf --max-time 2 "$1" >/dev/null && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "the server exited before it was ready; see $3" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "the server was not ready after 60 s ($1); see $3" >&2
    exit 1
}
