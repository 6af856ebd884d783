"""gRPC serving: `carajax.proto` (package carajax.v1) and its committed stubs (regenerate with
scripts/gen_proto.sh), the worker server (`worker.serve`: one Engine behind the CaraServe
service), its Prometheus metrics (`metrics`), the proto <-> engine conversions (`codec`) and the
router (`router`). The client lives in `carajax.client`."""
