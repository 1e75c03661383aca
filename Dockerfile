# The seqcast server image: `docker build -t seqcast .` at the repository root.
#
# Two stages: a Rust builder, and a slim Debian runtime holding the one binary (glibc, CA
# certificates, nothing else: no shell tools are needed, `seqcast health` is the health check).
# The binary embeds its migrations (sqlx::migrate!), so the image needs no migrations/ directory.
# docs/operations.md ("Docker Compose", "Kubernetes") says how the image is run.

FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: built against stub sources from the manifests and the
# lock file alone, so a change to seqcast's own code reuses it. Every workspace member's manifest
# must be present (loadtest too) even though only the server is built.
COPY Cargo.toml Cargo.lock ./
COPY server/Cargo.toml server/build.rs server/
COPY protocol/Cargo.toml protocol/
COPY loadtest/Cargo.toml loadtest/
RUN mkdir -p server/src protocol/src loadtest/src \
    && echo 'fn main() {}' > server/src/main.rs \
    && touch server/src/lib.rs protocol/src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs \
    && cargo build --release --locked -p seqcast \
    && rm -rf server/src protocol/src loadtest/src

# The real sources. COPY keeps the files' own modification times, which are older than the stub
# build above, so cargo would take the stub crates as up to date: touch the crate roots.
COPY migrations migrations
COPY protocol/src protocol/src
COPY loadtest/src loadtest/src
COPY server/src server/src
# The demo page at / embeds the JavaScript client (server/src/demo).
COPY clients/js/src clients/js/src
RUN touch server/src/main.rs server/src/lib.rs protocol/src/lib.rs \
    && cargo build --release --locked -p seqcast \
    && install -m 0755 target/release/seqcast /usr/local/bin/seqcast

FROM debian:bookworm-slim
# CA certificates for TLS to Redis or Postgres; nothing else. Not pinned to a version (DL3008):
# bookworm's security updates to them should reach the next build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed, numeric, unprivileged user (Kubernetes' runAsNonRoot can check a numeric USER), with a
# writable working directory for the SQLite default (DATABASE_URL unset = sqlite://seqcast.db).
RUN groupadd --system --gid 10001 seqcast \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/seqcast \
        --no-create-home --shell /usr/sbin/nologin seqcast \
    && mkdir -p /var/lib/seqcast \
    && chown 10001:10001 /var/lib/seqcast
COPY --from=builder /usr/local/bin/seqcast /usr/local/bin/seqcast

USER 10001:10001
WORKDIR /var/lib/seqcast
# Inside a container the node must listen on every interface (the default is loopback only).
# Without SEQCAST_JWT_SECRET (or SEQCAST_JWT_PUBLIC_KEY) seqcast is in development mode and
# refuses to listen on anything but loopback, so the image needs one to serve:
#   docker run -e SEQCAST_JWT_SECRET=... -p 8080:8080 seqcast
ENV SEQCAST_LISTEN=0.0.0.0:8080
EXPOSE 8080

# Healthy = /ready answers 200 (a draining or starting node is unhealthy). There is no curl in the
# image: `seqcast health` makes the request and exits 0 on 200.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["seqcast", "health", "--url", "http://127.0.0.1:8080/ready"]

# SIGTERM starts the drain (docs/operations.md): /ready 503 at once, sessions closed with 1012
# after SEQCAST_DRAIN_DELAY over SEQCAST_DRAIN_SPREAD, exit by SEQCAST_SHUTDOWN_TIMEOUT. Give the
# container at least that long to stop (`docker stop -t`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["seqcast"]
CMD ["serve"]
