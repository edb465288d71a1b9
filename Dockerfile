# One image for spool-api, spoolctl, spool-worker and spool-dispatcher. libtorch comes from PyPI's torch
# 2.11.0 wheel (what tch 0.24 expects), as in scripts/setup.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch && /opt/torch/bin/pip install --no-cache-dir -r /dev/stdin <<'REQ'
torch==2.11.0
REQ
ENV LIBTORCH=/opt/torch/lib/python3.11/site-packages/torch
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p spool-api -p spool-worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libgomp1 && rm -rf /var/lib/apt/lists/*
# The binaries carry an rpath to the torch libraries at this same path.
COPY --from=build /opt/torch /opt/torch
COPY --from=build /src/target/release/spool-api /src/target/release/spool-worker /src/target/release/spool-dispatcher \
     /src/target/release/spoolctl /usr/local/bin/
COPY models /srv/spool/models
WORKDIR /srv/spool
EXPOSE 8080
CMD ["spool-api"]
