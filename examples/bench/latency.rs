//! A latency histogram the generator fills without allocating: microseconds,
//! exact below 1,024 µs, then 64 sub-buckets per power of two (under 1.6 % error).

/// Counts by bucket; merge per-subscriber histograms with [`Latency::merge`].
pub struct Latency {
    counts: Vec<u32>,
    total: u64,
    max: u64,
}

const LINEAR: u64 = 1024;
const SUB: u64 = 64;
/// Up to 2^40 µs (about 12 days): far past any run.
const BUCKETS: usize = (LINEAR + (40 - 10) * SUB) as usize;

impl Latency {
    pub fn new() -> Latency {
        Latency {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    pub fn record(&mut self, us: u64) {
        self.counts[index(us)] += 1;
        self.total += 1;
        self.max = self.max.max(us);
    }

    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max_us(&self) -> u64 {
        self.max
    }

    /// The lower bound of the bucket holding the `p` quantile, µs.
    pub fn quantile_us(&self, p: f64) -> u64 {
        let rank = ((self.total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return lower(i);
            }
        }
        self.max
    }
}

fn index(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - u64::from(us.leading_zeros());
    let sub = (us >> (exp - 6)) & (SUB - 1);
    ((LINEAR + (exp - 10) * SUB + sub) as usize).min(BUCKETS - 1)
}

fn lower(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let exp = (i - LINEAR) / SUB + 10;
    let sub = (i - LINEAR) % SUB;
    (1 << exp) | (sub << (exp - 6))
}
