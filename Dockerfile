# One image for spool-api, spoolctl, spool-worker and spool-dispatcher, with the model
# artifacts built in. libtorch comes from PyPI's torch 2.11.0 wheel (what tch 0.24 links
# against), as in scripts/setup; the same Python environment exports the models.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
COPY models/requirements.txt /src/models/requirements.txt
RUN python3 -m venv /opt/torch && /opt/torch/bin/pip install --no-cache-dir -r /src/models/requirements.txt
ENV LIBTORCH=/opt/torch/lib/python3.11/site-packages/torch
WORKDIR /src
COPY . .
RUN /opt/torch/bin/python models/digits-cnn/train.py --if-missing && /opt/torch/bin/python models/minilm-embed/export.py
RUN cargo build --release --locked -p spool-api -p spool-worker --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libgomp1 && rm -rf /var/lib/apt/lists/*
# Only torch's shared libraries and the CUDA ones beside them, at the path the binaries'
# rpath names; none of Python is needed at run time.
ARG SITE=/opt/torch/lib/python3.11/site-packages
COPY --from=build $SITE/torch/lib $SITE/torch/lib
COPY --from=build $SITE/nvidia $SITE/nvidia
COPY --from=build /src/target/release/spool-api /src/target/release/spool-worker /src/target/release/spool-dispatcher \
     /src/target/release/spoolctl /usr/local/bin/
COPY --from=build /src/models /srv/spool/models
WORKDIR /srv/spool
EXPOSE 8080
CMD ["spool-api"]
