//! Property tests: merging records is commutative, associative and idempotent, and folding the
//! same changes in any order yields the same view.

use haven_state::{Change, Hlc, Origin, Record, StreamEvent, Version, View, merge};
use proptest::prelude::*;

fn origin() -> impl Strategy<Value = Origin> {
    (
        prop::sample::select(vec!["eu", "us"]),
        prop::sample::select(vec!["n1", "n2", "n3"]),
    )
        .prop_map(|(r, n)| Origin::new(r, n))
}

fn record_for(key: &'static str) -> impl Strategy<Value = Record> {
    (
        0u64..50,
        0u16..3,
        origin(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..4)),
        prop::option::of(0u64..100),
    )
        .prop_map(move |(ms, l, origin, value, exp)| Record {
            namespace: "ns".into(),
            key: key.into(),
            version: Version {
                hlc: Hlc::new(ms, l),
                origin,
            },
            value,
            expires_at_millis: exp,
        })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "c"])
            .prop_flat_map(record_for)
            .prop_map(Change::Record),
        (
            prop::sample::select(vec!["s1", "s2"]),
            1u64..4,
            0u64..50,
            origin(),
            prop::collection::vec(any::<u8>(), 0..3)
        )
            .prop_map(|(s, i, ms, origin, data)| Change::Event(StreamEvent {
                stream: s.into(),
                index: i,
                version: Version {
                    hlc: Hlc::new(ms, 0),
                    origin
                },
                data,
            })),
    ]
}

proptest! {
    #[test]
    fn merge_is_commutative(a in record_for("k"), b in record_for("k")) {
        prop_assert_eq!(merge(a.clone(), b.clone()), merge(b, a));
    }

    #[test]
    fn merge_is_associative(a in record_for("k"), b in record_for("k"), c in record_for("k")) {
        prop_assert_eq!(
            merge(merge(a.clone(), b.clone()), c.clone()),
            merge(a, merge(b, c))
        );
    }

    #[test]
    fn merge_is_idempotent(a in record_for("k"), b in record_for("k")) {
        let m = merge(a.clone(), b.clone());
        prop_assert_eq!(merge(m.clone(), m.clone()), m.clone());
        prop_assert_eq!(merge(m.clone(), b), m);
    }

    #[test]
    fn views_converge_in_any_order(
        changes in prop::collection::vec(change(), 0..40),
        seed in any::<u64>(),
    ) {
        let mut forward = View::default();
        for c in &changes { forward.apply(c); }
        // A pseudo-random permutation, with every change delivered twice.
        let mut shuffled: Vec<_> = changes.iter().chain(changes.iter()).collect();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut other = View::default();
        for c in shuffled { other.apply(c); }
        prop_assert_eq!(&forward, &other);

        // Merging split halves in either order also converges.
        let (l, r) = changes.split_at(changes.len() / 2);
        let mut left = View::default();
        for c in l { left.apply(c); }
        let mut right = View::default();
        for c in r { right.apply(c); }
        let mut lr = left.clone(); lr.merge(&right);
        let mut rl = right.clone(); rl.merge(&left);
        prop_assert_eq!(&lr, &rl);
        prop_assert_eq!(&lr, &forward);
    }
}
