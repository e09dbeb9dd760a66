# syntax=docker/dockerfile:1
# flowgate: build with the Rust toolchain, run on a slim Debian as a non-root user.
#   docker build -t flowgate .
#   docker run -p 8080:8080 flowgate                      # the baked example config (SQLite)
#   docker run -p 8080:8080 -v $PWD/my.toml:/etc/flowgate/flowgate.toml:ro \
#     -e FLOWGATE_STORE_URL=postgres://… -e FLOWGATE_ADMIN_TOKENS=… flowgate

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
# Build settings (the bundled SQLite's compile options).
COPY .cargo .cargo
# The manifest names the benchmarks: they must exist for it to parse.
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY migrations migrations
# The usage page's templates, compiled into the binary (askama).
COPY templates templates
COPY config config
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip target/release/flowgate
# The example config, made for a container: every interface, the data volume, JSON logs.
RUN sed -e 's|^listen = .*|listen = "0.0.0.0:8080"|' \
        -e 's|^url = "sqlite://.*|url = "sqlite:///var/lib/flowgate/flowgate.db"|' \
        -e 's|^format = "text"|format = "json"|' \
        config/flowgate.toml > flowgate.toml

FROM debian:bookworm-slim
# The distribution's current CA bundle is the one wanted, not a pinned old one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flowgate \
    && useradd --system --uid 10001 --gid flowgate --home-dir /var/lib/flowgate --shell /usr/sbin/nologin flowgate \
    && mkdir -p /var/lib/flowgate /etc/flowgate \
    && chown flowgate:flowgate /var/lib/flowgate
COPY --from=build /src/target/release/flowgate /usr/local/bin/flowgate
COPY --from=build /src/flowgate.toml /etc/flowgate/flowgate.toml
USER 10001:10001
WORKDIR /var/lib/flowgate
VOLUME ["/var/lib/flowgate"]
EXPOSE 8080
ENTRYPOINT ["flowgate"]
CMD ["serve", "--config", "/etc/flowgate/flowgate.toml"]
