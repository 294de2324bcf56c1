//! The CUDA kernels (src/cuda) against the ATen path they replace and an fp64 reference, on the
//! GPU. Where libtorch sees no CUDA device each test says so and returns: CI machines have none;
//! the GPU machine runs this file's release test binary (scripts/bench/gpu-kernels.sh).

use std::sync::{Arc, Mutex, MutexGuard};

use astra_train::config::{ModelConfig, ViTConfig};
use astra_train::cuda::nearest::Search;
use astra_train::cuda::{self, Kernels};
use astra_train::model::{Backbone, Model};
use astra_train::models::vq::{code_stats_aten, nearest_aten};
use tch::{Device, Kind, Tensor};

/// Tests that turn the kernels off (to compare) would starve the others: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Gpu {
    _serial: MutexGuard<'static, ()>,
    dev: Device,
    k: Arc<Kernels>,
}

fn gpu() -> Option<Gpu> {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: the kernel tests are skipped here");
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    cuda::set_enabled(true);
    let dev = Device::Cuda(0);
    let k = cuda::kernels(dev).expect("the kernels build on a machine with a CUDA device");
    Some(Gpu {
        _serial: serial,
        dev,
        k,
    })
}

/// fp64 squared distance of every row [M, G, W] to codeword `idx` [M, G] of its group.
fn dist64(x: &Tensor, cb: &Tensor, idx: &Tensor) -> Tensor {
    let (g, k, w) = (cb.size()[0], cb.size()[1], cb.size()[2]);
    let offsets = Tensor::arange(g, (Kind::Int64, x.device())) * k;
    let flat = (idx + offsets.view([1, g])).reshape([-1]);
    let c = cb
        .reshape([g * k, w])
        .index_select(0, &flat)
        .view(x.size().as_slice());
    (x.to_kind(Kind::Double) - c.to_kind(Kind::Double))
        .square()
        .sum_dim_intlist(-1, false, Kind::Double)
}

/// How the kernel's indices compare with ATen's and with the fp64 optimum; panics where a
/// disagreement is more than fp32 rounding.
fn check_nearest(k: &Kernels, x: &Tensor, cb: &Tensor, what: &str) -> f64 {
    let mut agree = 1.0f64;
    let mut tensor_cores = Vec::new();
    for search in searches(k, x.size()[2], cb.size()[1]) {
        let ours = cuda::nearest::nearest_codeword_with(k, x, cb, search).unwrap();
        agree = agree.min(check_indices(x, cb, &ours, &format!("{what}, {search:?}")));
        if search != Search::Fma {
            tensor_cores.push(ours);
        }
    }
    // The resident and streamed tensor-core kernels do the same arithmetic in the same order.
    if let [streamed, resident] = &tensor_cores[..] {
        assert!(
            streamed.equal(resident),
            "{what}: resident ≠ streamed indices"
        );
    }
    agree
}

/// The searches that take groups of `width` and `codes` codewords on this GPU: the FMA kernels
/// always, the tensor-core ones for groups of at most 32 on compute capability 8.0 and later (the
/// resident one where the codebook fits a block's shared memory).
fn searches(k: &Kernels, width: i64, codes: i64) -> Vec<Search> {
    let mut s = vec![Search::Fma];
    if width <= 32 && k.has_tf32_mma() {
        s.push(Search::TensorCores);
        if cuda::nearest::resident_fits(k, width, codes) {
            s.push(Search::TensorCoresResident);
        }
    }
    s
}

fn check_indices(x: &Tensor, cb: &Tensor, ours: &Tensor, what: &str) -> f64 {
    let aten = nearest_aten(x, cb);
    let (d_ours, d_aten) = (dist64(x, cb, ours), dist64(x, cb, &aten));
    // fp32 rounding of ‖c‖² − 2·x·c is relative to ‖x‖² + ‖c‖², not to the distance.
    let scale = x
        .to_kind(Kind::Double)
        .square()
        .sum_dim_intlist(-1, false, Kind::Double)
        + cb.to_kind(Kind::Double)
            .square()
            .sum_dim_intlist(-1, false, Kind::Double)
            .max();
    let gap = (&d_ours - &d_aten).abs() / &scale;
    let worst = gap.max().double_value(&[]);
    let agree = ours
        .eq_tensor(&aten)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    eprintln!(
        "{what}: {:.5}% of indices equal ATen's; worst relative gap {worst:.2e}",
        agree * 100.0
    );
    assert!(
        worst <= 1e-5,
        "{what}: a disagreement beyond fp32 rounding ({worst:e})"
    );
    assert!(
        agree >= 0.999,
        "{what}: only {agree} of indices equal ATen's"
    );
    agree
}

fn random_case(dev: Device, m: i64, g: i64, k: i64, w: i64) -> (Tensor, Tensor) {
    let cb = Tensor::randn([g, k, w], (Kind::Float, dev));
    // Half the rows near a codeword (where real inputs are), half anywhere.
    let near_idx = Tensor::randint(k, [m / 2, g], (Kind::Int64, dev));
    // [K, G, w] gathered along K: row i, group g takes codeword near_idx[i, g] of group g.
    let near = cb.transpose(0, 1).gather(
        0,
        &near_idx.unsqueeze(-1).expand([m / 2, g, w], false),
        false,
    ) + Tensor::randn([m / 2, g, w], (Kind::Float, dev)) * 0.1;
    let far = Tensor::randn([m - m / 2, g, w], (Kind::Float, dev)) * 1.5;
    (Tensor::cat(&[near, far], 0).contiguous(), cb)
}

#[test]
fn nearest_codeword_equals_aten_up_to_fp32_rounding() {
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(1);
    if k.has_tf32_mma() && std::env::var("ASTRA_NEAREST").is_err() {
        // The training and inference paths take the tensor cores for groups of ≤ 32, with the
        // codebook resident where it fits a block (ViT-B's K = 1,024 of 24 values: 196 KiB on
        // an H100/H200, 227 KiB a block) and streamed where it does not.
        use cuda::nearest::search_for;
        let expected = if k.shared_memory_optin() >= 200_704 {
            Search::TensorCoresResident
        } else {
            Search::TensorCores
        };
        assert_eq!(search_for(&k, 24, 1024), expected);
        assert_eq!(search_for(&k, 24, 8192), Search::TensorCores);
        assert_eq!(search_for(&k, 33, 16), Search::Fma);
    }
    // ViT-B at G = 32 and G = 1, ragged sizes (no dimension a multiple of a tile), a single row.
    for (m, g, n, w) in [
        (20_000, 32, 1024, 24),
        (6_000, 1, 1024, 768),
        (777, 3, 100, 7),
        (2_500, 5, 257, 12),
        // The widest group of the narrow kernel, and the narrowest of the general one.
        (4_099, 4, 300, 32),
        (513, 2, 129, 33),
        (1, 2, 1, 1),
        // One group over many rows: the resident kernel's warps take several row tiles each.
        (150_001, 1, 1000, 24),
        // Codebooks too large to be resident (streamed), and the largest resident one at W = 32.
        (3_001, 2, 4099, 20),
        (5_000, 3, 880, 32),
    ] {
        let (x, cb) = random_case(dev, m, g, n, w);
        check_nearest(&k, &x, &cb, &format!("random M={m} G={g} K={n} W={w}"));
    }
}

#[test]
fn nearest_codeword_on_real_block_inputs() {
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(2);
    let vit = ViTConfig {
        image_size: 64,
        ..ViTConfig::vit_base_patch16_224(10)
    };
    let model = Model::new(ModelConfig::ViT(vit), dev).unwrap();
    let Backbone::ViT(net) = &model.net else {
        unreachable!()
    };
    let images = Tensor::rand([64, 3, 64, 64], (Kind::Float, dev));
    let inputs = tch::no_grad(|| net.block_inputs(&images).unwrap());
    for (l, x) in inputs.iter().enumerate().step_by(5) {
        let d = x.size()[2];
        for g in [1, 32] {
            let rows = x.reshape([-1, g, d / g]).contiguous();
            // Codewords drawn from the rows themselves, as k-means++ and dead-code restarts do:
            // some rows sit exactly on a codeword.
            let pick = Tensor::randperm(rows.size()[0], (Kind::Int64, dev)).narrow(0, 0, 256);
            let cb = rows.index_select(0, &pick).transpose(0, 1).contiguous();
            check_nearest(
                &k,
                &rows,
                &cb,
                &format!("ViT block {l} input, G={g}, K=256"),
            );
        }
    }
}

#[test]
fn exact_ties_go_to_the_lowest_index_and_nan_rows_to_zero() {
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(3);
    let cb = Tensor::randn([2, 300, 16], (Kind::Float, dev));
    // Codeword 250 duplicates codeword 7 in both groups; rows that sit on it must pick 7.
    cb.narrow(1, 250, 1).copy_(&cb.narrow(1, 7, 1));
    let x = cb
        .narrow(1, 7, 1)
        .transpose(0, 1)
        .repeat([5, 1, 1])
        .contiguous(); // [5, 2, 16]
    for search in searches(&k, 16, 300) {
        let ours = cuda::nearest::nearest_codeword_with(&k, &x, &cb, search).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(ours.reshape([-1])).unwrap(),
            vec![7; 10],
            "{search:?}"
        );
    }
    let _ = x.get(0).fill_(f64::NAN);
    for search in searches(&k, 16, 300) {
        let ours = cuda::nearest::nearest_codeword_with(&k, &x, &cb, search).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(ours.get(0)).unwrap(),
            vec![0, 0],
            "{search:?}"
        );
    }
    let aten = nearest_aten(&x, &cb);
    eprintln!(
        "ATen's argmin on an all-NaN row: {:?}",
        Vec::<i64>::try_from(aten.get(0)).unwrap()
    );
}

#[test]
fn code_stats_equal_the_two_index_adds() {
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(4);
    // ViT-B's groups, a large codebook, ragged sizes, fewer rows than a block, and rows that
    // all pick one code (every atomic on the same few addresses).
    for (m, g, n, w, one_code) in [
        (30_000, 32, 1024, 24, false),
        (5_000, 2, 8192, 24, false),
        (1_001, 3, 100, 7, false),
        (5, 4, 64, 3, false),
        (4_000, 2, 256, 16, true),
    ] {
        let x = Tensor::randn([m, g, w], (Kind::Float, dev));
        let idx = match one_code {
            true => Tensor::full([m, g], n - 1, (Kind::Int64, dev)),
            false => Tensor::randint(n, [m, g], (Kind::Int64, dev)),
        };
        let (c_ref, s_ref) = code_stats_aten(&x, &idx, n);
        let (counts, sums) = cuda::ema::code_stats(&k, &x, &idx, n).unwrap();
        let what = format!("M={m} G={g} K={n} W={w}");
        assert!(counts.equal(&c_ref), "{what}: counts differ");
        let err = (&sums - &s_ref).abs().max().double_value(&[]);
        // fp32 sums of up to M values of N(0, 1), added in another order.
        let bound = 1e-5 * (m as f64).sqrt().max(10.0);
        assert!(err < bound, "{what}: sums differ by {err}");
    }
}

#[test]
fn gathered_codewords_equal_the_index_select_and_bad_indices_give_nan() {
    use astra_quant::{BlockQuantizer, GroupedCodebook};
    use astra_train::models::vq::{GroupedVq, VqConfig};
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(7);
    let (m, g, n, w) = (10_001, 32, 1024, 24);
    let flat =
        Vec::<f32>::try_from(Tensor::randn([g * n * w], (Kind::Float, Device::Cpu))).unwrap();
    let q = BlockQuantizer {
        usage: None,
        codebook: GroupedCodebook::from_flat(g as usize, n as usize, w as usize, flat).unwrap(),
        noise: None,
    };
    let vq = GroupedVq::from_quantizer(&q, VqConfig::default(), dev);
    let idx = Tensor::randint(n, [7, m / 7, g], (Kind::Int64, dev));
    let ours = vq.decode(&idx);
    cuda::set_enabled(false);
    let aten = vq.decode(&idx);
    cuda::set_enabled(true);
    assert_eq!(ours.size(), [7, m / 7, g * w]);
    assert!(
        ours.equal(&aten),
        "gathered codewords differ from index_select"
    );
    let bad = Tensor::from_slice(&[0i64, n, -1, 3]).view([2, 2]).to(dev);
    let cb = Tensor::randn([2, n, 4], (Kind::Float, dev));
    let out = cuda::nearest::gather_codewords(&k, &cb, &bad).unwrap();
    let nan = Vec::<bool>::try_from(out.isnan().any_dim(-1, false).reshape([-1])).unwrap();
    assert_eq!(nan, [false, true, true, false]);
}

#[test]
fn kernels_reject_wrong_layouts_in_one_line() {
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    let cb = Tensor::randn([2, 8, 4], (Kind::Float, dev));
    let bad = [
        (Tensor::randn([5, 2, 4], (Kind::Double, dev)), "Double"),
        (
            Tensor::randn([5, 4, 2], (Kind::Float, dev)).transpose(1, 2),
            "contiguous",
        ),
        (Tensor::randn([5, 3, 4], (Kind::Float, dev)), "[M, G, W]"),
        (Tensor::randn([5, 2, 4], (Kind::Float, Device::Cpu)), "Cpu"),
    ];
    for (x, needle) in bad {
        let e = cuda::nearest::nearest_codeword(&k, &x, &cb)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle) && !e.contains('\n'), "{e}");
    }
}

#[test]
fn codeword_target_equals_the_aten_ops_bit_for_bit() {
    use astra_train::cuda::target::{codeword_target, DiagonalNoise};
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(9);
    let (b, s, t, g, n, w) = (6, 40, 37, 32, 1024, 24);
    let (d, f) = (g * w, (Kind::Float, dev));
    let cb = Tensor::randn([g, n, w], f);
    // The content rows of a [B, S, D] stream, as the models pass them: a narrow (strided rows).
    let x = Tensor::randn([b, s, d], f).narrow(1, 3, t);
    let idx = Tensor::randint(n, [b * t, g], (Kind::Int64, dev));
    let z = Tensor::randn([b * t, d], f);
    let (std, mean) = (Tensor::rand([d], f) * 0.1, Tensor::randn([d], f) * 0.01);
    let lambda = 0.7;
    // The ATen path's expressions (models::vq::GroupedVq::target_offset).
    let offsets = Tensor::arange(g, (Kind::Int64, dev)) * n;
    let flat = (&idx + offsets.view([1, g])).reshape([-1]);
    let x_hat = cb
        .reshape([g * n, w])
        .index_select(0, &flat)
        .reshape([b, t, d]);
    let noise = (&z * &std + &mean).reshape([b, t, d]);
    let offset = (&x_hat + noise * lambda) - &x;
    let nz = DiagonalNoise {
        z: &z,
        scale: &std,
        shift: &mean,
        lambda,
    };
    let (x_hat_k, offset_k) = codeword_target(&k, &x, &idx, &cb, Some(&nz)).unwrap();
    assert!(x_hat_k.reshape([b, t, d]).equal(&x_hat), "codewords");
    let gap = (offset_k.reshape([b, t, d]) - &offset).abs().max();
    assert!(
        gap.double_value(&[]) == 0.0,
        "offsets differ by {gap:?}: not rounded as ATen"
    );
    // The value X + offset written in place over a copy of the rows, as the training quantizer
    // takes it: rounded as ATen's add of the offset.
    let copy = x.contiguous().reshape([b * t, d]);
    let x_hat_v = cuda::target::codeword_value_in_place(&k, &copy, &idx, &cb, Some(&nz)).unwrap();
    assert!(
        x_hat_v.reshape([b, t, d]).equal(&x_hat),
        "codewords (value)"
    );
    let value = &x + &offset;
    let gap = (copy.reshape([b, t, d]) - &value).abs().max();
    assert!(
        gap.double_value(&[]) == 0.0,
        "values differ by {gap:?}: not rounded as ATen"
    );
    // No noise, rows given as [M, D].
    let rows = x.reshape([b * t, d]);
    let (_, plain) = codeword_target(&k, &rows, &idx, &cb, None).unwrap();
    assert!(plain.equal(&(x_hat.reshape([b * t, d]) - &rows)));
    // An index outside 0..K gives NaN codewords, not a read past the codebook.
    let _ = idx.get(0).get(1).fill_(n);
    let (bad, _) = codeword_target(&k, &rows, &idx, &cb, None).unwrap();
    let nan = bad.get(0).isnan().sum(Kind::Int64).int64_value(&[]);
    assert_eq!(nan, w, "one group's codeword of row 0 is NaN");
    // Rows that do not fit the codebook are refused in one line.
    let e = codeword_target(&k, &rows.narrow(1, 0, d - 1), &idx, &cb, None).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
}

#[test]
fn a_training_quantize_step_is_the_same_with_and_without_kernels() {
    use astra_quant::{BlockQuantizer, GroupedCodebook};
    use astra_train::models::vq::{GroupedVq, VqConfig};
    let Some(Gpu { dev, .. }) = gpu() else { return };
    let (m, g, n, w) = (8_192, 32, 1024, 24);
    tch::manual_seed(5);
    let flat =
        Vec::<f32>::try_from(Tensor::randn([g * n * w], (Kind::Float, Device::Cpu))).unwrap();
    let q = BlockQuantizer {
        usage: None,
        codebook: GroupedCodebook::from_flat(g as usize, n as usize, w as usize, flat).unwrap(),
        noise: Some(astra_quant::NoiseModel::Diagonal {
            mean: vec![0.01; (g * w) as usize],
            std: vec![0.05; (g * w) as usize],
        }),
    };
    // Content rows of a stream with one CLS slot in front: strided, as the models pass them.
    let stream = Tensor::randn([16, m / 16 + 1, g * w], (Kind::Float, dev)).set_requires_grad(true);
    let x = stream.narrow(1, 1, m / 16);
    let before = x.detach().copy();
    let weights = Tensor::randn([m, g, w], (Kind::Float, dev));
    // The step, and the gradient of the stream under a loss of the value and the commitment.
    let step = |kernels: bool| {
        cuda::set_enabled(kernels);
        let mut vq = GroupedVq::from_quantizer(&q, VqConfig::default(), dev);
        tch::manual_seed(6);
        let out = vq.quantize(&x, true);
        cuda::set_enabled(true);
        let value = out.value.reshape([m, g, w]);
        let loss = (&value * &weights).sum(Kind::Float) + &out.commitment * 1e3;
        let grad = Tensor::run_backward(&[loss], &[&stream], false, false)
            .remove(0)
            .narrow(1, 1, m / 16)
            .reshape([m, g, w]);
        (
            out.indices,
            vq.codebook.shallow_clone(),
            out.commitment.detach(),
            value.detach(),
            grad,
        )
    };
    let (i_k, cb_k, c_k, v_k, g_k) = step(true);
    assert!(x.equal(&before), "the kernels wrote into x");
    let (i_a, cb_a, c_a, v_a, g_a) = step(false);
    // Same noise draw on both paths: where the searches agree, the values and the gradients
    // (identity through the value, the commitment's through X̂) agree bit for bit.
    let same = i_k
        .reshape([m, g])
        .eq_tensor(&i_a.reshape([m, g]))
        .unsqueeze(-1);
    for (what, ours, aten) in [("values", &v_k, &v_a), ("gradients", &g_k, &g_a)] {
        let gap = (ours - aten)
            .abs()
            .where_self(&same, &ours.zeros_like())
            .max();
        assert!(gap.double_value(&[]) == 0.0, "{what} differ by {gap:?}");
    }
    let agree = i_k
        .eq_tensor(&i_a)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!(agree >= 0.999, "indices agree on {agree}");
    let cb_err = (&cb_k - &cb_a).abs().max().double_value(&[]);
    assert!(cb_err < 1e-3, "updated codebooks differ by {cb_err}");
    let c_err = (c_k - c_a).abs().double_value(&[]);
    assert!(c_err < 1e-4, "commitment losses differ by {c_err}");
    // A contiguous X in evaluation: the kernel writes into a copy of it, never into X.
    let xc = x.detach().contiguous();
    let kept = xc.copy();
    let eval = |kernels: bool| {
        cuda::set_enabled(kernels);
        let out = GroupedVq::from_quantizer(&q, VqConfig::default(), dev).quantize(&xc, false);
        cuda::set_enabled(true);
        (out.indices.reshape([m, g]), out.value.reshape([m, g, w]))
    };
    let ((i_k, v_k), (i_a, v_a)) = (eval(true), eval(false));
    assert!(xc.equal(&kept), "the kernels wrote into a contiguous x");
    let same = i_k.eq_tensor(&i_a).unsqueeze(-1);
    let gap = (&v_k - &v_a)
        .abs()
        .where_self(&same, &v_k.zeros_like())
        .max();
    assert!(
        gap.double_value(&[]) == 0.0,
        "evaluation values differ by {gap:?}"
    );
}

#[test]
fn the_fused_adamw_step_equals_the_aten_one() {
    use astra_train::train::optim::{AdamW, AdamWConfig};
    let Some(Gpu { dev, .. }) = gpu() else { return };
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
        clip_norm: 1.0,
        warmup_steps: 2,
        total_steps: 10,
        min_lr_ratio: 0.1,
    };
    let run = |kernels: bool| {
        cuda::set_enabled(kernels);
        tch::manual_seed(7);
        let vs = tch::nn::VarStore::new(dev);
        let lin = tch::nn::linear(vs.root() / "lin", 64, 32, Default::default());
        let emb = vs.root().randn("emb", &[100, 64], 0.0, 1.0);
        let mut opt = AdamW::new(&vs, cfg.clone());
        let x = Tensor::randn([16, 64], (Kind::Float, dev));
        for _ in 0..5 {
            opt.zero_grad();
            let y = x.apply(&lin).tanh().sum(Kind::Float) + emb.square().mean(Kind::Float) * 50.0;
            y.backward();
            opt.step();
        }
        cuda::set_enabled(true);
        (lin.ws.copy(), emb.copy())
    };
    let (w_k, e_k) = run(true);
    let (w_a, e_a) = run(false);
    // The kernel's fused multiply-adds round differently from ATen's separate kernels: after 5
    // steps of lr 1e-2 the weights (of size ~1) agree to ~1e-6, far below one step's move.
    let err = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(
        err(&w_k, &w_a) < 1e-5 && err(&e_k, &e_a) < 1e-5,
        "{} {}",
        err(&w_k, &w_a),
        err(&e_k, &e_a)
    );
}

/// Calibration's k-means with its searches on the GPU reaches astra-quant's CPU objective.
#[test]
fn calibration_kmeans_on_the_gpu_matches_the_cpu() {
    use astra_quant::{GroupedCodebook, KMeansConfig};
    use astra_train::train::calibrate::TorchSearch;
    let Some(Gpu { dev, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(8);
    let (x, _) = random_case(Device::Cpu, 20_000, 4, 256, 24);
    let x = ndarray::Array2::from_shape_vec(
        (20_000, 96),
        Vec::<f32>::try_from(x.reshape([-1])).unwrap(),
    )
    .unwrap();
    let cfg = KMeansConfig {
        iters: 10,
        ..KMeansConfig::new(256)
    };
    let (cb_g, st_g) = GroupedCodebook::fit_with(x.view(), 4, &cfg, &TorchSearch(dev)).unwrap();
    let (cb_c, st_c) = GroupedCodebook::fit(x.view(), 4, &cfg).unwrap();
    for (g, c) in st_g.iter().zip(&st_c) {
        let (og, oc) = (g.last().unwrap().objective, c.last().unwrap().objective);
        assert!(
            (og - oc).abs() <= 1e-3 * oc,
            "objectives {og} (GPU) vs {oc} (CPU)"
        );
    }
    let enc_g = cb_g.encode_with(x.view(), &TorchSearch(dev)).unwrap();
    let enc_c = cb_g.encode(x.view()).unwrap();
    let same = enc_g
        .iter()
        .zip(enc_c.iter())
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same as f64 >= 0.999 * enc_g.len() as f64,
        "{same} of {} indices",
        enc_g.len()
    );
    drop(cb_c);
}

/// The fused softmax cross-entropy kernel against its ATen form at GPT-2's vocabulary: summed
/// loss to 1e-5, the same hits, gradients to 1e-5 in fp32 (the kernel's fast exponential) and to
/// bf16 rounding in bf16; a target outside the vocabulary gives NaN, not a read outside the row.
#[test]
fn softmax_cross_entropy_kernel_equals_aten() {
    use astra_train::models::lm_head::softmax_cross_entropy_grad_aten;
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(10);
    let (c, v) = (300, 50257);
    let y = Tensor::randint(v, [c], (Kind::Int64, dev));
    let _ = y.narrow(0, 7, 20).fill_(-100);
    for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 1e-2)] {
        let logits = (Tensor::randn([c, v], (Kind::Float, dev)) * 4.0).to_kind(kind);
        let (mine, theirs) = (logits.copy(), logits.copy());
        let (l1, h1) = cuda::xent::softmax_xent_grad(&k, &mine, &y, -100).unwrap();
        let (l2, h2) = softmax_cross_entropy_grad_aten(&theirs, &y, -100);
        let rel = ((&l1 - &l2).abs() / l2.abs()).double_value(&[]);
        assert!(rel < 1e-5, "{kind:?}: loss {l1:?} vs {l2:?}");
        assert!(h1.equal(&h2), "{kind:?}: hits {h1:?} vs {h2:?}");
        let diff = (mine.to_kind(Kind::Float) - theirs.to_kind(Kind::Float))
            .abs()
            .max();
        assert!(
            diff.double_value(&[]) < tol,
            "{kind:?}: gradients differ by {diff:?}"
        );
    }
    // Rows apart by more than V (a narrow of logits padded for aligned GEMMs): the same loss and
    // gradient, and the padding untouched.
    let logits = Tensor::randn([c, v], (Kind::Float, dev)) * 4.0;
    let padded = Tensor::full([c, v + 47], 7.0, (Kind::Float, dev));
    padded.narrow(1, 0, v).copy_(&logits);
    let (l1, h1) = cuda::xent::softmax_xent_grad(&k, &padded.narrow(1, 0, v), &y, -100).unwrap();
    let (l2, h2) = cuda::xent::softmax_xent_grad(&k, &logits, &y, -100).unwrap();
    assert!(
        l1.equal(&l2) && h1.equal(&h2),
        "padded rows: {l1:?} vs {l2:?}"
    );
    assert!(
        padded.narrow(1, 0, v).equal(&logits),
        "padded rows' gradients"
    );
    let pad = padded.narrow(1, v, 47);
    assert!(
        pad.eq(7.0).all().int64_value(&[]) == 1,
        "the padding was written"
    );
    let bad = Tensor::from_slice(&[3i64, v + 5]).to_device(dev);
    let logits = Tensor::randn([2, v], (Kind::Float, dev));
    let (l, _) = cuda::xent::softmax_xent_grad(&k, &logits, &bad, -100).unwrap();
    assert!(l.double_value(&[]).is_nan());
}

/// The fused head and loss of a language model equal autograd's cross-entropy on its logits under
/// bf16 autocast on the GPU: loss to 1e-3, gradients of the states and the output matrix to bf16
/// rounding.
#[test]
fn fused_lm_loss_equals_the_unfused_one_on_the_gpu() {
    use astra_train::models::lm_head::LmHead;
    let Some(Gpu { dev, .. }) = gpu() else {
        return;
    };
    tch::manual_seed(11);
    let vs = tch::nn::VarStore::new(dev);
    let ln = tch::nn::layer_norm(vs.root() / "ln", vec![768], Default::default());
    let w = vs.root().randn("w", &[50257, 768], 0.0, 0.02);
    let states = Tensor::randn([4, 1024, 768], (Kind::Float, dev)).set_requires_grad(true);
    let y = Tensor::randint(50257, [4, 1024], (Kind::Int64, dev));
    // bf16 autocast (the training setting) and fp32; the fused head pads the output matrix to
    // 50,304 rows on the GPU.
    let run = |fused: bool, bf16: bool| {
        astra_train::precision::bf16_autocast(bf16, || {
            let loss = if fused {
                LmHead {
                    norm: &ln,
                    weight: &w,
                }
                .loss(&states, &y, -100)
                .loss
            } else {
                astra_train::train::task::loss(&states.apply(&ln).matmul(&w.tr()), &y)
            };
            let g = Tensor::run_backward(&[&loss], &[&states, &w], false, false);
            (loss.detach(), g)
        })
        .unwrap()
    };
    let rel = |a: &Tensor, b: &Tensor| ((a - b).abs().max() / b.abs().max()).double_value(&[]);
    for (bf16, tol) in [(true, 2e-2), (false, 1e-4)] {
        let (l1, g1) = run(true, bf16);
        let (l2, g2) = run(false, bf16);
        assert!(rel(&l1, &l2) < 1e-3, "bf16 {bf16}: loss {l1:?} vs {l2:?}");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert!(rel(a, b) < tol, "bf16 {bf16}: gradient {i}: {}", rel(a, b));
        }
    }
}

#[test]
fn fused_query_key_value_equal_three_gemms_on_the_gpu() {
    let Some(Gpu { dev, .. }) = gpu() else {
        return;
    };
    use astra_train::models::layers::{fused_linears, linear};
    tch::manual_seed(6);
    let vs = tch::nn::VarStore::new(dev);
    let cfg = tch::nn::LinearConfig::default();
    let p = vs.root();
    let (q, k, v) = (
        linear(&p / "q", 768, 768, cfg),
        linear(&p / "k", 768, 768, cfg),
        linear(&p / "v", 768, 768, cfg),
    );
    let x = Tensor::randn([8, 197, 768], (Kind::Float, dev)).set_requires_grad(true);
    // Under bf16 autocast, as training runs them; gradients of x through a loss weighing each.
    let grad_x = |outs: [Tensor; 3]| {
        let loss: Tensor = outs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                (o.to_kind(Kind::Float) * (i as f64 + 1.0))
                    .sin()
                    .sum(Kind::Float)
            })
            .sum();
        let g = Tensor::run_backward(&[loss], &[&x], false, false);
        (
            outs.map(|o| o.detach().to_kind(Kind::Float)),
            g[0].shallow_clone(),
        )
    };
    let (fused, gf) = tch::autocast(true, || grad_x(fused_linears(&x, [&q, &k, &v]).unwrap()));
    let (one_by_one, g1) = tch::autocast(true, || grad_x([x.apply(&q), x.apply(&k), x.apply(&v)]));
    for (f, o) in fused.iter().zip(&one_by_one).chain([(&gf, &g1)]) {
        let scale = o.abs().max().double_value(&[]);
        let gap = (f - o).abs().max().double_value(&[]) / scale;
        // bf16 GEMMs of another shape may sum in another order: bf16 rounding, no more.
        assert!(
            gap < 2e-2,
            "fused q, k, v differ by {gap:e} of their largest value"
        );
    }
}

#[test]
fn ema_step_kernel_equals_the_aten_expressions_restarts_included() {
    let Some(Gpu { dev, k, .. }) = gpu() else {
        return;
    };
    use astra_train::cuda::ema::{ema_step, EmaSettings};
    tch::manual_seed(7);
    let (m, g, n, w) = (3_000, 5, 1_000, 24);
    let f = (Kind::Float, dev);
    let rows = Tensor::randn([m, g, w], f);
    let counts = Tensor::randint(20, [g, n], f);
    let sums = Tensor::randn([g, n, w], f);
    let ema_count = Tensor::rand([g, n], f) * 10.0 + 1.0;
    // Codes 0, 7 and 999 of every group have (almost) no count: they must restart.
    for c in [0, 7, 999] {
        let _ = ema_count.narrow(1, c, 1).fill_(0.0);
        let _ = counts.narrow(1, c, 1).fill_(0.0);
    }
    let ema_sum = Tensor::randn([g, n, w], f);
    let pick = Tensor::randint(m, [g, n], (Kind::Int64, dev));
    let cfg = EmaSettings {
        decay: 0.99,
        epsilon: 1e-5,
        dead_threshold: 1e-3,
    };
    let (count_k, sum_k, cb_k) = ema_step(
        &k,
        (&counts, &sums),
        (&ema_count, &ema_sum),
        &rows,
        &pick,
        &cfg,
    )
    .unwrap();
    // The ATen path's expressions (models::vq::GroupedVq::ema_update).
    let c = &ema_count * cfg.decay + &counts * (1.0 - cfg.decay);
    let s = &ema_sum * cfg.decay + &sums * (1.0 - cfg.decay);
    let total = c.sum_dim_intlist(-1, true, Kind::Float);
    let smoothed = (&c + cfg.epsilon) / (&total + cfg.epsilon * n as f64) * &total;
    let new_cb = &s / smoothed.unsqueeze(-1);
    let mean = &total / n as f64;
    let dead = c.lt_tensor(&(&mean * cfg.dead_threshold));
    let fresh = rows
        .transpose(0, 1)
        .gather(1, &pick.unsqueeze(-1).expand([g, n, w], false), false);
    let dead3 = dead.unsqueeze(-1).expand([g, n, w], false).logical_not();
    let restart = mean.expand([g, n], false);
    let cb_a = new_cb.where_self(&dead3, &fresh);
    let sum_a = s.where_self(&dead3, &(&fresh * restart.unsqueeze(-1)));
    let count_a = c.where_self(&dead.logical_not(), &restart);
    assert_eq!(
        dead.sum(Kind::Int64).int64_value(&[]),
        3 * g,
        "the zeroed codes, and only they, are dead"
    );
    for (what, ours, aten) in [
        ("counts", &count_k, &count_a),
        ("sums", &sum_k, &sum_a),
        ("codebook", &cb_k, &cb_a),
    ] {
        let gap = ((ours - aten).abs() / (aten.abs() + 1e-6))
            .max()
            .double_value(&[]);
        // Only the per-group total is summed in another order: fp32 rounding of it, no more.
        assert!(gap < 1e-5, "{what}: relative gap {gap:e}");
    }
    let restarted = cb_k.narrow(1, 7, 1);
    assert!(
        restarted.equal(&fresh.narrow(1, 7, 1)),
        "a dead code takes its picked row exactly"
    );
}
