//! The data-parallel engine on several CPU workers (in CI): results bitwise equal to one worker's,
//! in request order and exactly once under concurrent callers; work spread over the workers; a
//! worker whose device is lost (the `lose_device_after` test hook) taken out of the rotation and
//! its requests served by the others; all lost: every request fails with DeviceLost.

#[path = "common/engine_cases.rs"]
mod engine_cases;

use std::sync::{Arc, Barrier};

use engine_cases::{mixed_requests, Model};
use jv4::engine::CallOptions;
use jv4::{Device, Embedding, Engine, Error, Request, Task};

fn ok(out: Vec<jv4::Result<Embedding>>) -> Vec<Embedding> {
    out.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i}: {e}"))).collect()
}

/// One request per window, so that each goes to a worker of its own choosing.
fn one_by_one(engine: &Engine, reqs: &[Request]) -> Vec<jv4::Result<Embedding>> {
    engine.embed_with(reqs, &CallOptions { window: 1, ..CallOptions::default() })
}

/// Texts of different lengths and tasks, `seed` making each caller's own.
fn texts(seed: usize, n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| {
            let words = " more words".repeat((seed * 7 + i * 3) % 11);
            Request::text(format!("caller {seed} request {i}{words}")).task(Task::ALL[(seed + i) % 3])
        })
        .collect()
}

fn three_cpus(model: &Model, lose: Vec<(usize, u64)>) -> Engine {
    model
        .engine(Device::Cpu, |o| {
            o.devices = vec![Device::Cpu; 3];
            o.lose_device_after = lose;
        })
        .unwrap()
}

#[test]
fn several_workers_equal_one_bitwise_and_share_the_work() {
    let model = Model::new().unwrap();
    let one = model.engine(Device::Cpu, |_| {}).unwrap();
    let three = three_cpus(&model, Vec::new());
    assert_eq!(three.devices().len(), 3);
    assert_eq!(three.describe().matches("cpu").count(), 3, "{}", three.describe());
    let reqs = mixed_requests();
    let want = ok(one.embed(&reqs));
    assert_eq!(ok(one_by_one(&three, &reqs)), want, "one request per window");
    assert_eq!(ok(three.embed(&reqs)), want, "all in one window");
    let devices = three.devices();
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d.device, Device::Cpu);
        assert!(d.lost.is_none(), "worker {i}: {:?}", d.lost);
        // The first three windows go to the three idle workers in turn.
        assert!(d.stats.forwards >= 1, "worker {i} ran no forward: {devices:?}");
    }
    let stats = three.stats();
    assert_eq!(stats.sequences, 2 * reqs.len() as u64, "every request embedded exactly once");
    assert_eq!(stats.forwards, devices.iter().map(|d| d.stats.forwards).sum::<u64>());
    let batches: u64 = three.batch_sizes().iter().map(|b| b.1).sum();
    assert_eq!(batches, stats.forwards);
    let m = three.memory().unwrap();
    assert_eq!(m.weights, 3 * one.memory().unwrap().weights, "summed over the devices");
}

#[test]
fn concurrent_callers_get_their_own_results_once_in_order() {
    let model = Model::new().unwrap();
    let one = model.engine(Device::Cpu, |_| {}).unwrap();
    let three = three_cpus(&model, Vec::new());
    let callers = 4;
    let per = 9;
    let want: Vec<Vec<Embedding>> = (0..callers).map(|c| ok(one.embed(&texts(c, per)))).collect();
    let barrier = Arc::new(Barrier::new(callers));
    let got: Vec<Vec<Embedding>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..callers)
            .map(|c| {
                let (engine, barrier) = (three.clone(), barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    let reqs = texts(c, per);
                    let opts = CallOptions { window: 1 + c % 3, ..CallOptions::default() };
                    ok(engine.embed_with(&reqs, &opts))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for c in 0..callers {
        assert_eq!(got[c], want[c], "caller {c}: its own results, in its order");
    }
    assert_eq!(three.stats().sequences, (callers * per) as u64, "each request embedded exactly once");
    assert!(
        three.devices().iter().filter(|d| d.stats.forwards > 0).count() >= 2,
        "the work is spread: {:?}",
        three.devices()
    );
}

#[test]
fn a_lost_worker_is_taken_out_and_its_requests_served_by_the_others() {
    let model = Model::new().unwrap();
    let one = model.engine(Device::Cpu, |_| {}).unwrap();
    // Worker 1 fails its first forward: it gets the second window (the idle workers take turns).
    let three = three_cpus(&model, vec![(1, 0)]);
    let reqs = texts(5, 12);
    let want = ok(one.embed(&reqs));
    assert_eq!(ok(one_by_one(&three, &reqs)), want, "every request answered, by the others");
    let devices = three.devices();
    let lost =
        devices[1].lost.as_deref().unwrap_or_else(|| panic!("worker 1 not reported lost: {devices:?}"));
    assert!(lost.contains("injected"), "{lost}");
    assert!(devices[0].lost.is_none() && devices[2].lost.is_none(), "{devices:?}");
    assert_eq!(devices[1].stats.forwards, 0);
    assert!(devices[0].stats.forwards > 0 && devices[2].stats.forwards > 0, "{devices:?}");
    assert_eq!(three.stats().sequences, reqs.len() as u64, "each request embedded exactly once");
    // Later calls, concurrent ones too, go to the two left.
    let again: Vec<Vec<Embedding>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| ok(one_by_one(&three, &reqs)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for got in again {
        assert_eq!(got, want);
    }
    assert_eq!(three.devices()[1].stats.forwards, 0);
    assert_eq!(three.stats().sequences, 4 * reqs.len() as u64);
}

#[test]
fn a_request_in_two_lost_forwards_fails_instead_of_taking_a_third_device() {
    let model = Model::new().unwrap();
    // Workers 0 and 1 fail their first forward; the one request goes to 0 (idle workers take
    // turns from 0), is re-sent once to 1, and after that second loss fails with its error
    // rather than reaching worker 2: a request that faults every device must not take them all.
    let three = three_cpus(&model, vec![(0, 0), (1, 0)]);
    let r = three.embed(&texts(3, 1)).remove(0);
    assert!(matches!(&r, Err(jv4::Error::DeviceLost(_))), "{r:?}");
    let devices = three.devices();
    assert!(devices[0].lost.is_some() && devices[1].lost.is_some(), "{devices:?}");
    assert!(devices[2].lost.is_none() && devices[2].stats.forwards == 0, "{devices:?}");
    // Worker 2 still serves new requests.
    let again = three.embed(&texts(4, 2));
    assert!(again.iter().all(|r| r.is_ok()), "{again:?}");
    assert!(three.devices()[2].stats.forwards > 0);
}

#[test]
fn with_every_device_lost_requests_fail_with_device_lost() {
    let model = Model::new().unwrap();
    // The first of two lost: the second serves alone.
    let two = model
        .engine(Device::Cpu, |o| {
            o.devices = vec![Device::Cpu; 2];
            o.lose_device_after = vec![(0, 0)];
        })
        .unwrap();
    let reqs = texts(1, 4);
    assert_eq!(ok(one_by_one(&two, &reqs)), ok(model.engine(Device::Cpu, |_| {}).unwrap().embed(&reqs)));
    assert!(two.devices()[0].lost.is_some() && two.devices()[1].lost.is_none(), "{:?}", two.devices());
    // One device, or both of two: every request fails with the device's error, now and later.
    for lose in [vec![(0, 0)], vec![(0, 0), (1, 1)]] {
        let n = lose.len();
        let engine = model
            .engine(Device::Cpu, |o| {
                o.devices = vec![Device::Cpu; n];
                o.lose_device_after = lose.clone();
            })
            .unwrap();
        let r = one_by_one(&engine, &texts(2, 6));
        assert_eq!(r.len(), 6);
        let served = r.iter().filter(|x| x.is_ok()).count();
        assert_eq!(served as u64, engine.stats().sequences, "{r:?}");
        for x in r.iter().filter(|x| x.is_err()) {
            assert!(matches!(x, Err(Error::DeviceLost(m)) if m.contains("injected")), "{x:?}");
        }
        assert!(engine.stats().forwards <= 1, "at most worker 1's one good forward: {r:?}");
        assert!(engine.devices().iter().all(|d| d.lost.is_some()), "{:?}", engine.devices());
        assert!(matches!(&engine.embed(&texts(3, 1))[0], Err(Error::DeviceLost(_))), "still lost, at once");
    }
}

#[test]
fn device_lists_are_checked() {
    let model = Model::new().unwrap();
    for (devices, want) in [
        (vec![Device::Cpu, Device::Cuda(0)], "all CUDA or all cpu"),
        (vec![Device::Cuda(1), Device::Cuda(1)], "cuda:1 is listed twice"),
    ] {
        match model.engine(Device::Cpu, |o| o.devices = devices.clone()) {
            Ok(_) => panic!("{devices:?} accepted"),
            Err(e) => assert!(e.contains(want), "{devices:?}: {e}"),
        }
    }
}
