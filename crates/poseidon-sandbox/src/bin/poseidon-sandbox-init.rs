//! The runner init for this crate's tests and examples; production runs it as
//! `poseidon sandbox-init`.

fn main() {
    poseidon_sandbox::init::main(std::env::args_os().skip(1).collect())
}
