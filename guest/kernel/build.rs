// SPDX-License-Identifier: Apache-2.0
//! Links the guest kernel as a static, non-PIE ELF at 1 MiB with our linker script, without the
//! C runtime: the VMM loads it like a vmlinux and enters `_start`.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link.ld");
}
