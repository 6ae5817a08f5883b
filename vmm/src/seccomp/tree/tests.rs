// SPDX-License-Identifier: Apache-2.0
//! The tree's programs against seccompiler's, run by a small interpreter of the instructions
//! seccompiler emits.

use super::*;
use crate::seccomp::{SeccompMode, ThreadKind, rule_map};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;

/// A `struct seccomp_data`: number, architecture, instruction pointer, six arguments.
fn data(nr: u32, arch: u32, args: [u64; 6]) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[0..4].copy_from_slice(&nr.to_le_bytes());
    d[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    d
}

/// Runs `program` on `d`: its answer, and the steps taken before it first loaded anything but
/// the number or the architecture, or answered (what the kernel's action cache walks when a
/// filter is installed).
fn run(program: &[sock_filter], d: &[u8; 64]) -> (u32, usize) {
    let (mut pc, mut a, mut steps, mut walking) = (0usize, 0u32, 0usize, true);
    loop {
        let i = &program[pc];
        pc += 1;
        if walking {
            steps += 1;
        }
        match i.code {
            LD_W_ABS => {
                let k = i.k as usize;
                walking &= k < 8;
                a = u32::from_le_bytes(d[k..k + 4].try_into().unwrap());
            }
            // BPF_ALU | BPF_AND | BPF_K
            0x54 => a &= i.k,
            JA => pc += i.k as usize,
            JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
            // BPF_JMP | BPF_JGT | BPF_K
            0x25 => pc += usize::from(if a > i.k { i.jt } else { i.jf }),
            JGE_K => pc += usize::from(if a >= i.k { i.jt } else { i.jf }),
            RET_K => return (i.k, steps),
            other => panic!("instruction {other:#x} at {} is not one seccompiler emits", pc - 1),
        }
    }
}

/// Every constant the program compares with or masks by, and its neighbours.
fn constants(program: &[sock_filter]) -> Vec<u32> {
    let mut out: Vec<u32> = program
        .iter()
        .filter(|i| matches!(i.code, JEQ_K | JGE_K | 0x25 | 0x54))
        .flat_map(|i| [i.k, i.k.wrapping_add(1), i.k.wrapping_sub(1), !i.k])
        .chain([0, u32::MAX])
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Both programs of `kind` in `mode`: seccompiler's and the tree's.
fn both(kind: ThreadKind, mode: SeccompMode) -> (BpfProgram, BpfProgram) {
    let mismatch = if mode == SeccompMode::Log { SeccompAction::Log } else { SeccompAction::Trap };
    let plain: BpfProgram =
        SeccompFilter::new(rule_map(kind).unwrap(), mismatch.clone(), SeccompAction::Allow, TargetArch::x86_64)
            .unwrap()
            .try_into()
            .unwrap();
    let tree = compile(rule_map(kind).unwrap(), mismatch, SeccompAction::Allow, TargetArch::x86_64).unwrap();
    (plain, tree)
}

#[test]
fn every_kind_gives_seccompilers_answers() {
    for mode in [SeccompMode::Enforce, SeccompMode::Log] {
        for kind in ThreadKind::ALL {
            let (plain, tree) = both(kind, mode);
            let values = constants(&plain);
            // An xorshift, so that the arguments are the same on every run.
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut compared = 0usize;
            for nr in 0..600u32 {
                for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
                    let mut cases = vec![[0u64; 6]];
                    // One argument at a time on each of the rules' values, the high half set or not.
                    for arg in 0..6 {
                        for &v in &values {
                            for high in [0u64, 1 << 32] {
                                let mut args = [0u64; 6];
                                args[arg] = u64::from(v) | high;
                                cases.push(args);
                            }
                        }
                    }
                    // And mixed, for rules on several arguments.
                    for _ in 0..64 {
                        let pick = |r: u64| u64::from(values[(r % values.len() as u64) as usize]);
                        cases.push(std::array::from_fn(|_| pick(next())));
                    }
                    for args in cases {
                        let d = data(nr, arch, args);
                        let (want, _) = run(&plain, &d);
                        let (got, _) = run(&tree, &d);
                        assert_eq!(got, want, "{kind:?} ({mode:?}): call {nr}, arch {arch:#x}, arguments {args:x?}");
                        compared += 1;
                    }
                }
            }
            assert!(compared > 600 * 2, "{kind:?}: only {compared} cases");
        }
    }
}

#[test]
fn every_number_is_decided_in_a_few_steps() {
    for kind in ThreadKind::ALL {
        let (plain, tree) = both(kind, SeccompMode::Enforce);
        let walk = |p: &[sock_filter]| (0..600).map(|nr| run(p, &data(nr, AUDIT_ARCH_X86_64, [0; 6])).1).max();
        let (plain_max, tree_max) = (walk(&plain).unwrap(), walk(&tree).unwrap());
        // About 2 log2(n / LEAF) steps down the tree, 2 LEAF in a leaf, 4 around them.
        assert!(tree_max <= 24, "{kind:?}: a number takes {tree_max} steps in the tree");
        assert!(plain_max > 4 * tree_max, "{kind:?}: seccompiler's chain takes {plain_max} steps, the tree {tree_max}");
    }
}

#[test]
fn no_call_and_one_call() {
    let none = compile(BTreeMap::new(), SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64).unwrap();
    let trap = u32::from(SeccompAction::Trap);
    assert_eq!(run(&none, &data(0, AUDIT_ARCH_X86_64, [0; 6])).0, trap);
    let one =
        compile(BTreeMap::from([(39, Vec::new())]), SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
            .unwrap();
    assert_eq!(run(&one, &data(39, AUDIT_ARCH_X86_64, [0; 6])).0, u32::from(SeccompAction::Allow));
    assert_eq!(run(&one, &data(40, AUDIT_ARCH_X86_64, [0; 6])).0, trap);
    // Another architecture is killed before the number is looked at.
    assert_eq!(run(&one, &data(39, AUDIT_ARCH_I386, [0; 6])).0, libc::SECCOMP_RET_KILL_PROCESS);
}
