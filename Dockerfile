# Build: docker build -t wandist .
# Run:   docker run -v /path/to/config-dir:/etc/wandist:ro -p 4370:4370 -p 9570:9570 wandist
# In a container, set [metrics] listen = "0.0.0.0:9570": the health check
# and scrapers use it. The image runs as uid 10001; make its certificates
# readable by it: `wandist certs --owner 10001:10001 --out DIR CLUSTER`
# (keys stay 0600), or chown them. `.ci/docker-build-stage` builds the
# build stage from exactly the files these COPY lines name, without an engine.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin wandist \
 && strip target/release/wandist

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin wandist
COPY --from=build /src/target/release/wandist /usr/local/bin/wandist
# mimalloc commits memory as used: an idle link then costs ~46 KiB, not ~70 (BENCHMARKS.md).
ENV MIMALLOC_ARENA_EAGER_COMMIT=0
USER 10001:10001
EXPOSE 4370 9570
# Ready: every local node with its scopes, every route up (/readyz).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/wandist", "health", "--config", "/etc/wandist/gateway.toml"]
ENTRYPOINT ["/usr/local/bin/wandist"]
CMD ["run", "--config", "/etc/wandist/gateway.toml"]
