// SPDX-License-Identifier: Apache-2.0
//! seccompiler's filters with a binary search on the system call number in front.
//!
//! seccompiler compares the number with each allowed call in turn. When a filter is installed,
//! the kernel runs it for every system call number of the architecture to find the calls it
//! always allows (its action cache), so installing a program whose numbers are a chain of about
//! 150 comparisons costs some 70 000 steps: 0.4 ms for the VMM thread's filter under nested
//! virtualisation here, 0.2 ms for a vCPU's, and every thread installs one before it runs. With
//! a search tree each number is found, or not, in about 16 steps instead of up to 300.
//!
//! What each call is allowed with stays seccompiler's: every call's block of argument checks is
//! cut, unchanged, from the program seccompiler compiles for that call alone, and only entered
//! when the number matches, as in seccompiler's own program. The tree's leaves answer the calls
//! allowed whatever their arguments directly. A program whose shape is not the one this module
//! expects is an error, never a guess; the tests run both programs on every number and on
//! arguments drawn from the rules' own values and check that they give the same answer.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch, sock_filter};

/// `BPF_LD | BPF_W | BPF_ABS`: the accumulator gets the 32-bit word at offset `k`.
const LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JA`: forward by `k`.
const JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const JGE_K: u16 = 0x35;
/// `BPF_RET | BPF_K`.
const RET_K: u16 = 0x06;
/// Where `struct seccomp_data` keeps the system call number.
const NR_OFFSET: u32 = 0;
/// The kernel's limit on a program's length (`BPF_MAXINSNS`).
const MAX_LEN: usize = 4096;
/// Numbers a leaf of the tree compares one after the other.
const LEAF: usize = 4;

/// Errors compiling a filter.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Backend(#[from] seccompiler::BackendError),
    #[error("seccompiler's program for system call {0} is not shaped as expected")]
    Shape(i64),
    #[error("the filter would have {0} instructions, more than the kernel takes")]
    TooLong(usize),
}

/// A jump whose target is known once everything is laid out.
enum Target {
    /// The block of argument checks of the call at this index.
    Block(usize),
    /// An instruction of the tree, by index in it.
    Tree(usize),
}

/// The same filter as `SeccompFilter::new(rules, mismatch, matched, arch)` would compile to,
/// with a search tree on the system call number (see the module documentation).
pub fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, TreeError> {
    let ret_mismatch = stmt(RET_K, u32::from(mismatch.clone()));
    let ret_matched = stmt(RET_K, u32::from(matched.clone()));
    let mut prefix = None;
    // (number, its block of argument checks, if it has any)
    let mut calls: Vec<(u32, Option<Vec<sock_filter>>)> = Vec::with_capacity(rules.len());
    for (nr, chain) in rules {
        let number = u32::try_from(nr).map_err(|_| TreeError::Shape(nr))?;
        let unconditional = chain.is_empty();
        let alone = SeccompFilter::new(BTreeMap::from([(nr, chain)]), mismatch.clone(), matched.clone(), arch)?;
        let program: BpfProgram = alone.try_into()?;
        let (head, block) = split(&program, number, &ret_mismatch).ok_or(TreeError::Shape(nr))?;
        match &prefix {
            None => prefix = Some(head.to_vec()),
            Some(p) if p.as_slice() == head => {}
            Some(_) => return Err(TreeError::Shape(nr)),
        }
        calls.push((number, (!unconditional).then(|| block.to_vec())));
    }
    let Some(prefix) = prefix else {
        // No call allowed: seccompiler's program is the architecture check and the mismatch.
        return Ok(SeccompFilter::new(BTreeMap::new(), mismatch, matched, arch)?.try_into()?);
    };

    let mut tree = Vec::new();
    let mut fixups = Vec::new();
    let numbers: Vec<u32> = calls.iter().map(|(n, _)| *n).collect();
    emit_tree(&numbers, 0, &calls, &ret_matched, &ret_mismatch, &mut tree, &mut fixups);

    // Layout: prefix, load the number, the tree, then each block followed by a mismatch (what
    // seccompiler's block falls through to when its number does not match, never the case here).
    let tree_start = prefix.len() + 1;
    let mut block_at = vec![0usize; calls.len()];
    let mut at = tree_start + tree.len();
    for (i, (_, block)) in calls.iter().enumerate() {
        if let Some(b) = block {
            block_at[i] = at;
            at += b.len() + 1;
        }
    }
    if at > MAX_LEN {
        return Err(TreeError::TooLong(at));
    }
    for (index, target) in fixups {
        let to = match target {
            Target::Block(i) => block_at[i],
            Target::Tree(t) => tree_start + t,
        };
        // Jumps only go forward; `to` is past the JA at `tree_start + index`.
        tree[index].k = (to - (tree_start + index) - 1) as u32;
    }
    let mut program = prefix;
    program.push(stmt(LD_W_ABS, NR_OFFSET));
    program.extend(tree);
    for (_, block) in calls {
        if let Some(b) = block {
            program.extend(b);
            program.push(ret_mismatch.clone());
        }
    }
    Ok(program)
}

/// Splits seccompiler's program for the one call `number` into what comes before loading the
/// number (the architecture check) and the call's block (from its comparison with `number` to
/// before the final mismatch), checking that the block's jumps stay inside it or land just past
/// its end (on the mismatch that follows it in both layouts).
fn split<'a>(
    program: &'a [sock_filter],
    number: u32,
    ret_mismatch: &sock_filter,
) -> Option<(&'a [sock_filter], &'a [sock_filter])> {
    let load = program.iter().position(|i| i.code == LD_W_ABS && i.k == NR_OFFSET)?;
    let (last, body) = program.get(load + 1..)?.split_last()?;
    if last != ret_mismatch || body.first().is_none_or(|i| i.code != JEQ_K || i.k != number) {
        return None;
    }
    let inside = body.iter().enumerate().all(|(pc, i)| match i.code & 0x07 {
        // BPF_JMP: JA jumps by k, the others by jt or jf.
        0x05 if i.code == JA => pc + 1 + i.k as usize <= body.len(),
        0x05 => pc + 1 + usize::from(i.jt.max(i.jf)) <= body.len(),
        _ => true,
    });
    inside.then(|| (&program[..load], body))
}

/// Emits the search over `numbers` (sorted, the calls from index `first` on): inner nodes
/// compare with the middle number and go right when at least it, leaves compare each number.
fn emit_tree(
    numbers: &[u32],
    first: usize,
    calls: &[(u32, Option<Vec<sock_filter>>)],
    ret_matched: &sock_filter,
    ret_mismatch: &sock_filter,
    tree: &mut Vec<sock_filter>,
    fixups: &mut Vec<(usize, Target)>,
) {
    if numbers.len() <= LEAF {
        for (i, &n) in numbers.iter().enumerate() {
            // Equal: the next instruction (the answer, or a jump to the block); else skip it.
            tree.push(jump(JEQ_K, n, 0, 1));
            match &calls[first + i].1 {
                None => tree.push(ret_matched.clone()),
                Some(_) => {
                    fixups.push((tree.len(), Target::Block(first + i)));
                    tree.push(stmt(JA, 0));
                }
            }
        }
        tree.push(ret_mismatch.clone());
        return;
    }
    let mid = numbers.len() / 2;
    // At least the middle number: the next instruction jumps to the right half; else skip it.
    tree.push(jump(JGE_K, numbers[mid], 0, 1));
    let to_right = tree.len();
    tree.push(stmt(JA, 0));
    emit_tree(&numbers[..mid], first, calls, ret_matched, ret_mismatch, tree, fixups);
    fixups.push((to_right, Target::Tree(tree.len())));
    emit_tree(&numbers[mid..], first + mid, calls, ret_matched, ret_mismatch, tree, fixups);
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests;
