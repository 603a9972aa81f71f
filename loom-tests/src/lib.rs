//! Empty on purpose: the models live in `tests/models.rs`, which includes the
//! broker's own `src/sync/` files (so `cargo rustc --test models -- --cfg ...` can
//! apply a mutation to them without rebuilding loom). See `README.md`.
