// The JSON bodies added for `cella cp` and graceful stop: what the host
// sends, what a strict agent accepts, and that old peers stay compatible
// (new optional fields are absent unless set).
#include <gtest/gtest.h>

#include <cerrno>
#include <nlohmann/json.hpp>

#include "protocol/messages.h"

namespace cella::protocol {
namespace {

using json = nlohmann::json;

json Parsed(const std::string& text) { return json::parse(text); }

int DecodeErrno(std::string_view text) {
  auto r = DecodeRequest(text);
  return r ? 0 : r.error().errno_value;
}

TEST(AgentMessages, ShutdownGraceIsSentOnlyWhenSetAndBounded) {
  EXPECT_EQ(Parsed(EncodeRequest(ShutdownRequest{})), json({{"op", "shutdown"}}));
  EXPECT_EQ(Parsed(EncodeRequest(ShutdownRequest{5000})),
            json({{"op", "shutdown"}, {"grace_ms", 5000}}));

  auto decoded = DecodeRequest(R"({"op":"shutdown","grace_ms":120000})");
  ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
  ASSERT_TRUE(std::holds_alternative<ShutdownRequest>(*decoded));
  EXPECT_EQ(std::get<ShutdownRequest>(*decoded).grace_ms, 120000u);
  auto old_host = DecodeRequest(R"({"op":"shutdown"})");
  ASSERT_TRUE(old_host.has_value());
  EXPECT_EQ(std::get<ShutdownRequest>(*old_host).grace_ms, 0u);

  EXPECT_EQ(DecodeErrno(R"({"op":"shutdown","grace_ms":600001})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"shutdown","grace_ms":-1})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"shutdown","grace_ms":"5s"})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"shutdown","grace_ms":600000})"), 0);
}

TEST(AgentMessages, OptionalFileFieldsAreAbsentUnlessSet) {
  WriteFileRequest write;
  write.path = "/f";
  json w = Parsed(EncodeRequest(write));
  EXPECT_FALSE(w.contains("mtime"));
  EXPECT_FALSE(w.contains("uid"));
  MkdirRequest mkdir;
  mkdir.path = "/d";
  json m = Parsed(EncodeRequest(mkdir));
  EXPECT_FALSE(m.contains("uid"));
  EXPECT_FALSE(m.contains("gid"));

  write.mtime = -86400;  // before the epoch is a valid time
  mkdir.uid = 1234;
  mkdir.gid = 0;
  auto w2 = DecodeRequest(EncodeRequest(write));
  ASSERT_TRUE(w2.has_value()) << w2.error().message;
  EXPECT_EQ(std::get<WriteFileRequest>(*w2).mtime, -86400);
  auto m2 = DecodeRequest(EncodeRequest(mkdir));
  ASSERT_TRUE(m2.has_value()) << m2.error().message;
  EXPECT_EQ(std::get<MkdirRequest>(*m2).uid, 1234u);
  EXPECT_EQ(std::get<MkdirRequest>(*m2).gid, 0u);
}

TEST(AgentMessages, SymlinkAndSetAttrDecodeStrictly) {
  SymlinkRequest link{"/l", "../t", 1, 2, 3};
  auto back = DecodeRequest(EncodeRequest(link));
  ASSERT_TRUE(back.has_value()) << back.error().message;
  const auto& l = std::get<SymlinkRequest>(*back);
  EXPECT_EQ(l.path, "/l");
  EXPECT_EQ(l.target, "../t");
  EXPECT_EQ(l.uid, 1u);
  EXPECT_EQ(l.gid, 2u);
  EXPECT_EQ(l.mtime, 3);

  EXPECT_EQ(DecodeErrno(R"({"op":"symlink","path":"/l"})"), EINVAL);  // no target
  EXPECT_EQ(DecodeErrno(R"({"op":"symlink","path":"/l","target":""})"), EINVAL);
  EXPECT_EQ(
      DecodeErrno(R"({"op":"symlink","path":"/l","target":")" + std::string(4096, 'a') + R"("})"),
      EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"symlink","path":"/l","target":"t","follow":true})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"symlink","path":"/l","target":"t","uid":4294967295})"), EINVAL);

  SetAttrRequest attrs;
  attrs.path = "/p";
  attrs.mode = 04755;
  json a = Parsed(EncodeRequest(attrs));
  EXPECT_EQ(a, json({{"op", "set_attr"}, {"path", "/p"}, {"mode", 04755}}));
  EXPECT_EQ(DecodeErrno(a.dump()), 0);
  EXPECT_EQ(DecodeErrno(R"({"op":"set_attr","path":"/p"})"), EINVAL);  // nothing to set
  EXPECT_EQ(DecodeErrno(R"({"op":"set_attr","path":"/p","mode":8192})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"set_attr","path":"/p","mtime":1.5})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"set_attr","path":"","uid":1})"), EINVAL);
}

TEST(AgentMessages, ServeShareNamesOneShareByIndex) {
  json r = Parsed(EncodeRequest(ServeShareRequest{3}));
  EXPECT_EQ(r, json({{"op", "serve_share"}, {"index", 3}}));
  auto back = DecodeRequest(r.dump());
  ASSERT_TRUE(back) << back.error().message;
  ASSERT_TRUE(std::holds_alternative<ServeShareRequest>(*back));
  EXPECT_EQ(std::get<ServeShareRequest>(*back).index, 3u);
  EXPECT_EQ(DecodeErrno(R"({"op":"serve_share"})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"serve_share","index":64})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"serve_share","index":-1})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"serve_share","index":0,"tag":"x"})"), EINVAL);
}

TEST(AgentMessages, SharesMountedTakesNoFields) {
  json r = Parsed(EncodeRequest(SharesMountedRequest{}));
  EXPECT_EQ(r, json({{"op", "shares_mounted"}}));
  auto back = DecodeRequest(r.dump());
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_TRUE(std::holds_alternative<SharesMountedRequest>(*back));
  EXPECT_EQ(DecodeErrno(R"({"op":"shares_mounted","index":0})"), EINVAL);
}

TEST(AgentMessages, ReleaseTakesNoFields) {
  json r = Parsed(EncodeRequest(ReleaseRequest{}));
  EXPECT_EQ(r, json({{"op", "release"}}));
  auto back = DecodeRequest(r.dump());
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_TRUE(std::holds_alternative<ReleaseRequest>(*back));
  EXPECT_EQ(DecodeErrno(R"({"op":"release","grace_ms":1})"), EINVAL);
}

TEST(AgentMessages, ResumedCarriesTheHostsClockAndNothingElse) {
  ResumedRequest resumed;
  resumed.realtime_ns = 1'796'563'535'123'456'789;
  json r = Parsed(EncodeRequest(resumed));
  EXPECT_EQ(r, json({{"op", "resumed"}, {"realtime_ns", 1'796'563'535'123'456'789}}));
  auto back = DecodeRequest(r.dump());
  ASSERT_TRUE(back) << back.error().message;
  ASSERT_TRUE(std::holds_alternative<ResumedRequest>(*back));
  EXPECT_EQ(std::get<ResumedRequest>(*back).realtime_ns, resumed.realtime_ns);
  EXPECT_EQ(DecodeErrno(R"({"op":"resumed"})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"resumed","realtime_ns":0})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"resumed","realtime_ns":-5})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"resumed","realtime_ns":1.5})"), EINVAL);
  EXPECT_EQ(DecodeErrno(R"({"op":"resumed","realtime_ns":1,"extra":1})"), EINVAL);
}

TEST(AgentMessages, ResumedCarriesAnRngSeedAsBoundedHex) {
  ResumedRequest resumed;
  resumed.realtime_ns = 5;
  for (int i = 0; i < 16; ++i) resumed.rng_seed.push_back(static_cast<uint8_t>(i * 17));
  json r = Parsed(EncodeRequest(resumed));
  EXPECT_EQ(r.value("rng_seed", std::string()), "00112233445566778899aabbccddeeff");
  auto back = DecodeRequest(r.dump());
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(std::get<ResumedRequest>(*back).rng_seed, resumed.rng_seed);
  auto with_seed = [](const std::string& hex) {
    return DecodeErrno(R"({"op":"resumed","realtime_ns":1,"rng_seed":")" + hex + "\"}");
  };
  EXPECT_EQ(with_seed(std::string(32, 'a')), 0);
  EXPECT_EQ(with_seed(std::string(30, 'a')), EINVAL) << "below the minimum";
  EXPECT_EQ(with_seed(std::string(2 * kMaxRngSeed + 2, 'a')), EINVAL) << "above the maximum";
  EXPECT_EQ(with_seed(std::string(33, 'a')), EINVAL) << "odd length";
  EXPECT_EQ(with_seed(std::string(31, 'a') + "g"), EINVAL) << "not hex";
  EXPECT_EQ(with_seed(std::string(31, 'a') + "A"), EINVAL) << "not lowercase";
  EXPECT_EQ(DecodeErrno(R"({"op":"resumed","realtime_ns":1,"rng_seed":5})"), EINVAL);
}

TEST(AgentMessages, FileInfoCarriesLinkTargetsAndListOwners) {
  FileInfo link;
  link.name = "l";
  link.type = FileType::kSymlink;
  link.uid = 7;
  link.gid = 8;
  link.link_target = "/etc";
  auto stat = DecodeFileInfo(EncodeFileInfo(link));
  ASSERT_TRUE(stat.has_value()) << stat.error().message;
  EXPECT_EQ(stat->link_target, "/etc");
  auto list = DecodeList(EncodeList({link}));
  ASSERT_TRUE(list.has_value()) << list.error().message;
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].uid, 7u);
  EXPECT_EQ((*list)[0].gid, 8u);
  EXPECT_EQ((*list)[0].link_target, "/etc");

  // An agent from before the owner fields: list entries without them.
  auto old_list =
      DecodeList(R"({"entries":[{"name":"f","size":1,"mode":420,"mtime":5,"type":"file"}]})");
  ASSERT_TRUE(old_list.has_value()) << old_list.error().message;
  EXPECT_EQ((*old_list)[0].uid, 0u);
  // stat always had them.
  EXPECT_FALSE(
      DecodeFileInfo(R"({"name":"f","size":1,"mode":420,"mtime":5,"type":"file"})").has_value());
  // A target only belongs to a symlink, and is bounded.
  EXPECT_FALSE(DecodeFileInfo(R"({"name":"f","size":1,"mode":420,"mtime":5,"type":"file",)"
                              R"("uid":0,"gid":0,"link_target":"/etc"})")
                   .has_value());
  EXPECT_FALSE(DecodeFileInfo(R"({"name":"f","size":1,"mode":420,"mtime":5,"type":"symlink",)"
                              R"("uid":0,"gid":0,"link_target":""})")
                   .has_value());
}

}  // namespace
}  // namespace cella::protocol
