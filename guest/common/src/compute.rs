// SPDX-License-Identifier: Apache-2.0
//! The `compute` workload's job: `N` units of pure integer work whose combined result is a
//! 64-bit hash that depends on `N` alone.
//!
//! A unit is a chain of [`UNIT_ROUNDS`] rounds of a 64-bit mixing function seeded by the unit's
//! index: each round needs the previous one's result, so a unit is serial, CPU-bound work with
//! no memory traffic, and the compiler can neither vectorise nor shorten it. Units are
//! independent of each other, so every vCPU takes the next unit not yet taken, in any order,
//! and the job's result combines the unit results with a wrapping sum, which does not depend on
//! the order. So the result is the same on 1 or 32 vCPUs, on Linux or our guest, and however
//! often and wherever the guest was migrated while it ran: a page or register a migration got
//! wrong changes it.

/// Rounds per unit: about a millisecond of one CPU here, short enough that progress is smooth
/// and a vCPU that takes the last unit does not hold the job up for long.
pub const UNIT_ROUNDS: u32 = 1 << 18;

/// The result of unit `index`.
#[inline(never)]
pub fn unit(index: u64) -> u64 {
    let mut x = mix(index ^ 0x243f_6a88_85a3_08d3);
    for round in 0..UNIT_ROUNDS {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = x.rotate_left(23).wrapping_add(u64::from(round));
    }
    x
}

/// Adds a unit's result to the running sum (in any order).
#[inline]
pub fn combine(sum: u64, unit_result: u64) -> u64 {
    sum.wrapping_add(unit_result)
}

/// The job's result from the sum of all `units` unit results.
pub fn finish(sum: u64, units: u64) -> u64 {
    mix(sum ^ units.rotate_left(32))
}

/// The result of a job of `units` units, computed here and now (for tests and checks).
pub fn job_result(units: u64) -> u64 {
    finish((0..units).fold(0, |sum, i| combine(sum, unit(i))), units)
}

/// SplitMix64's finaliser: every input bit affects every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_does_not_depend_on_the_order_of_units() {
        let forward = (0..8).fold(0, |s, i| combine(s, unit(i)));
        let backward = (0..8).rev().fold(0, |s, i| combine(s, unit(i)));
        let interleaved = [3, 0, 7, 1, 6, 2, 5, 4].iter().fold(0, |s, &i| combine(s, unit(i)));
        assert_eq!(forward, backward);
        assert_eq!(forward, interleaved);
        assert_eq!(finish(forward, 8), job_result(8));
    }

    #[test]
    fn the_result_depends_on_every_unit_and_the_size() {
        assert_ne!(job_result(4), job_result(5));
        let all = (0..4).fold(0, |s, i| combine(s, unit(i)));
        let one_wrong = (0..4).fold(0, |s, i| combine(s, if i == 2 { unit(2) ^ 1 } else { unit(i) }));
        assert_ne!(finish(all, 4), finish(one_wrong, 4));
        assert_ne!(unit(0), unit(1));
    }

    /// The value both guests must print for `vmm.work=3`: a change here changes every job's
    /// result, so the guests of an old and a new build would disagree.
    #[test]
    fn known_result() {
        assert_eq!(job_result(3), KNOWN_3);
    }

    const KNOWN_3: u64 = 0x9a7e_734d_207a_9c11;
}
