// Builds a KernelTable from kernels_impl.h for the vector policy `V`. Included once by each
// instruction-set file (kernels_scalar.cpp, kernels_avx2.cpp) inside its unnamed namespace.
template <class V>
KernelTable make_table(const char* name) {
  KernelTable t;
  t.name = name;
  t.convert = &convert_dispatch<V>;
  t.sum_squares = &sum_squares_dispatch<V>;
  t.lars_update = &lars_dispatch<V>;
  t.accumulate_and_select = &accumulate_select_dispatch<V>;
  t.select_at_least = [](const float* r, int64_t n, float thr, int64_t base, int64_t* out,
                         int64_t cap) {
    return select_impl<V, false, DType::kFloat32>(const_cast<float*>(r), nullptr, n, thr, base,
                                                  out, cap);
  };
  return t;
}
